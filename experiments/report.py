"""The end-of-pipeline report: report.json (the contract below), report.md (the same as tables) and
curves.png (loss per supervised stage, the RL reward over all rolled-out groups per domain, informative
shares), written to the work directory and printed.

report.json:
    domains                         evaluated domains
    eval.<stage>.<domain>           {greedy, greedy_se, sampled, sampled_se, n}  (and eval.<stage>.mean)
    baselines.most_common.<domain>, baselines.chance.<domain>     (evaluation/baselines.py)
    paired.<later>_vs_<earlier>     {greedy_delta, greedy_se, sampled_delta, sampled_se,
                                     domains: {<domain>: {greedy_delta, greedy_se, ...}}} for consecutive
                                     evaluated stages (evaluation/stats.paired: the same prompts in both)
    rl                              {informative_share_trained, informative_share_rolled, rollouts,
                                     reward_rolled_first, reward_rolled_last} (first / last 3 iterations)
    seconds.<stage>, seconds.total  wall time per stage (and per stage's evaluation, "<stage>_eval")

Stage summaries carry `stage`, `history` (per-step rows) and `eval` (evaluation/evaluate.py's result).
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from glmv_jax.evaluation.stats import paired  # noqa: E402

EVAL_KEYS = ("greedy", "greedy_se", "sampled", "sampled_se", "n")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def rl_summary(history: Sequence[Mapping]) -> dict:
    """The RL block of report.json from the RL stage's history rows (None where a key was not recorded)."""
    def series(key):
        return [h[key] for h in history if key in h]

    def mean_of(key, part):
        values = series(key)
        return _mean(values[:3] if part == "first" else values[-3:]) if values else None

    trained = sum(h.get("trained_groups", 0) for h in history)
    informative = sum(h.get("trained_groups", 0) * h.get("informative_share_trained", 0.0) for h in history)
    return {"informative_share_trained": informative / trained if trained else None,
            "informative_share_rolled": _mean(series("informative_share_rolled")),
            # rollouts_total: every response generated, RLCS's offline pass@k included
            "rollouts": int(series("rollouts_total")[-1]) if series("rollouts_total") else
            (int(sum(series("rollouts"))) if series("rollouts") else None),
            "reward_rolled_first": mean_of("reward_rolled", "first"),
            "reward_rolled_last": mean_of("reward_rolled", "last")}


def build_report(summaries: Sequence[Mapping], seconds: Mapping[str, float] | None = None) -> dict:
    """report.json's dict from the stage summaries and the per-stage seconds."""
    evaluated = [s for s in summaries if s.get("eval") and "summary" in s["eval"]]
    domains = sorted({d for s in evaluated for d in s["eval"]["summary"] if d != "mean"})
    report: dict = {"domains": domains, "eval": {}, "baselines": {}, "paired": {}, "rl": None,
                    "seconds": dict(seconds or {})}
    for s in evaluated:
        table = s["eval"]["summary"]
        report["eval"][s["stage"]] = {d: {k: table[d].get(k) for k in EVAL_KEYS} for d in domains if d in table}
        report["eval"][s["stage"]]["mean"] = table.get("mean", {})
        if s["eval"].get("baselines") and not report["baselines"]:
            report["baselines"] = s["eval"]["baselines"]
    for before, after in zip(evaluated, evaluated[1:]):
        report["paired"][f"{after['stage']}_vs_{before['stage']}"] = paired(before["eval"]["prompts"],
                                                                          after["eval"]["prompts"])
    rl = [s for s in summaries if s.get("stage") == "rl" and s.get("history")]
    if rl:
        report["rl"] = rl_summary(rl[-1]["history"])
    if seconds:
        report["seconds"]["total"] = float(sum(v for k, v in seconds.items() if k != "total"))
    return report


def _fmt(value, se=None, signed=False) -> str:
    if value is None:
        return "-"
    text = f"{value:+.3f}" if signed else f"{value:.3f}"
    return text if se is None else f"{text} ± {se:.3f}"


def markdown(report: Mapping) -> str:
    """report.md: held-out accuracy per stage (greedy and sampled mean@k, ± SE), the baselines, paired deltas
    (* where |delta| > 2 SE), the RL block and the seconds."""
    domains = report["domains"]
    head = "| | " + " | ".join(domains) + " | mean |\n|" + "---|" * (len(domains) + 2)
    lines = ["# Held-out evaluation", "", "Greedy accuracy (mean verifier reward ± SE) after each stage:", "", head]
    for stage, table in report["eval"].items():
        cells = [_fmt(table.get(d, {}).get("greedy"), table.get(d, {}).get("greedy_se")) for d in domains]
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {_fmt(table['mean'].get('greedy'), table['mean'].get('greedy_se'))} |")
    if any("sampled" in t.get("mean", {}) for t in report["eval"].values()):
        lines += ["", "Sampled mean@k (temperature 1) ± SE:", "", head]
        for stage, table in report["eval"].items():
            cells = [_fmt(table.get(d, {}).get("sampled"), table.get(d, {}).get("sampled_se")) for d in domains]
            lines.append(f"| {stage} | " + " | ".join(cells) +
                         f" | {_fmt(table['mean'].get('sampled'), table['mean'].get('sampled_se'))} |")
    if report["baselines"]:
        lines += ["", "Baselines (no image: the train split's answer prior, scored by the same verifiers):", "", head]
        for name, table in report["baselines"].items():
            values = [table.get(d) for d in domains]
            lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in values) + f" | {_fmt(_mean(values))} |")
    for name, delta in report["paired"].items():
        lines += ["", f"Paired difference {name.replace('_vs_', ' - ')} (same prompts; * = |delta| > 2 SE):", "",
                  "| | " + " | ".join(domains) + " | mean |", "|" + "---|" * (len(domains) + 2)]
        for key in ("greedy", "sampled"):
            if f"{key}_delta" not in delta:
                continue
            cells = []
            for d in domains + ["mean"]:
                entry = delta if d == "mean" else delta["domains"].get(d, {})
                v, se = entry.get(f"{key}_delta"), entry.get(f"{key}_se")
                mark = "*" if v is not None and se and abs(v) > 2 * se else ""
                cells.append(_fmt(v, se, signed=True) + mark)
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if report.get("rl"):
        lines += ["", "RL: " + ", ".join(f"{k} {_fmt(v) if isinstance(v, float) else v}" for k, v in report["rl"].items())]
    if report.get("seconds"):
        lines += ["", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items())]
    return "\n".join(lines) + "\n"


def plot_curves(summaries: Sequence[Mapping], path: str) -> None:
    """Loss per supervised step, the RL reward over all rolled-out groups per domain (dotted: overall,
    dashed: kept groups), informative shares among rolled-out and trained groups."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))
    offset = 0
    for s in summaries:
        history = s.get("history") or []
        points = [(offset + i, h["loss"]) for i, h in enumerate(history) if "loss" in h]
        if points:
            axes[0].plot(*zip(*points), label=s["stage"])
        offset += len(history)
    rl = [s for s in summaries if s.get("stage") == "rl" and s.get("history")]
    if rl:
        history = rl[-1]["history"]
        steps = range(1, len(history) + 1)
        for key in sorted({k for h in history for k in h if k.startswith("reward_rolled/")}):
            axes[1].plot(steps, [h.get(key, math.nan) for h in history], label=key.split("/", 1)[1])
        axes[1].plot(steps, [h.get("reward_rolled", math.nan) for h in history], "k:", label="all (rolled out)")
        axes[1].plot(steps, [h.get("reward_kept", math.nan) for h in history], "k--", label="kept groups")
        axes[2].plot(steps, [h.get("informative_share_rolled", math.nan) for h in history], label="rolled out")
        axes[2].plot(steps, [h.get("informative_share_trained", math.nan) for h in history], label="trained")
    titles = ("training loss", "RL reward over rolled-out groups, per domain", "informative groups")
    for ax, title, xlabel in zip(axes, titles, ("step (supervised stages)", "RL iteration", "RL iteration")):
        ax.set(title=title, xlabel=xlabel)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(summaries: Sequence[Mapping], workdir: str, seconds: Mapping[str, float] | None = None) -> str:
    report = build_report(summaries, seconds)
    plot_path = os.path.join(workdir, "curves.png")
    plot_curves(summaries, plot_path)
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    lean = [{k: v for k, v in s.items() if k not in ("state", "history")} for s in summaries]
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(lean, f, indent=1, default=str)
    text = markdown(report) + f"\ncurves: {plot_path}\n"
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(text)
    print(text)
    return text
