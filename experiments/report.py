"""The end-of-pipeline report: a per-domain accuracy table per stage (held-out split) and a PNG of the
training curves, written to the work directory and printed.

Each stage summary may carry `history` (per-step metrics: loss, reward, ...) and `eval`
({domain: accuracy}, plus an optional "mean") measured after the stage.
"""

from __future__ import annotations

import json
import os
from typing import Sequence


def accuracy_table(summaries: Sequence[dict]) -> str:
    rows = [s for s in summaries if s.get("eval")]
    if not rows:
        return "(no evaluation results)"
    domains = sorted({d for s in rows for d in s["eval"]["accuracy"]})
    header = "| after stage | " + " | ".join(domains) + " | mean |"
    lines = [header, "|" + "---|" * (len(domains) + 2)]
    for s in rows:
        acc = s["eval"]["accuracy"]
        values = [acc.get(d, float("nan")) for d in domains]
        mean = sum(values) / len(values)
        lines.append(f"| {s['stage']} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {mean:.2f} |")
    return "\n".join(lines)


def plot_curves(summaries: Sequence[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "training loss"), ("reward", "RL reward (train prompts)"),
              ("informative_share", "informative groups")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    offset = 0
    for s in summaries:
        history = s.get("history") or []
        for ax, (key, title) in zip(axes, panels):
            points = [(offset + i, h[key]) for i, h in enumerate(history) if key in h]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=s["stage"])
                ax.set_title(title)
        offset += len(history)
    for ax in axes:
        ax.set_xlabel("step (all stages)")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(summaries: Sequence[dict], workdir: str) -> str:
    table = accuracy_table(summaries)
    plot_path = os.path.join(workdir, "curves.png")
    plot_curves(summaries, plot_path)
    lean = [{k: v for k, v in s.items() if k not in ("state", "history")} for s in summaries]
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(lean, f, indent=1, default=str)
    text = f"Held-out accuracy per domain after each stage\n\n{table}\n\ncurves: {plot_path}\n"
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(text)
    print(text)
    return text
