"""RLCS vs uniform vs DAPO prompt sampling, each running the same number of GRPO updates from the same SFT
checkpoint on the built-in task suite (issue #5).

For every seed and sampler, the demo's RL stage (experiments/configs/demo.py) starts from the SFT params
(`train.init_from`) with the same pool of train prompts, batch (B groups trained per update) and group size
(G), runs N iterations of run_rl, then evaluates greedy answers on the same held-out prompts
(evaluation/evaluate.py). Recorded per iteration (rl/stage.py's history rows): rollouts spent (responses
generated: DAPO's extra rounds, RLCS's expansion and, billed up front, RLCS's offline pass@k), the share of
informative groups (nonzero reward variance) among the groups trained on and among those rolled out, the
reward over all rolled-out groups and over the trained ones, verifier errors; per run: held-out reward per
domain and its mean, wall time; per sampler: paired held-out deltas (per-prompt scores averaged over the
seeds) against the SFT start and against uniform sampling. Writes rlcs.json and rlcs.png to --out and
appends a section to benchmarks/RESULTS.md (plot and a lean JSON copied to benchmarks/plots/ when the plot
is small).

    python -m benchmarks.rlcs --sft /tmp/demo_full/1_sft --iterations 8 --seeds 0,1
    python -m benchmarks.rlcs                     # trains pretrain + SFT with the demo config first

A run directory (named by sampler, seed and sizes) holding a finished run (its result.json) is reused, so a
rerun with the same --out resumes after the last finished run (so `--samplers rlcs_labels` with an earlier
--out adds the ablation row to the earlier runs). Wall times include XLA compiles: run_rl pads rollouts to a
few sizes (rl.rollout_pad_steps) and caches the GRPO update per settings, so the first run in a process pays
most compiles and later runs reuse them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.rl_runs import (PLOTS, RESULTS, demo_stages, evaluate_start, load_average, plain,  # noqa: E402
                                prepare_sft, read_history, run_cached, seed_mean_prompts)

SAMPLERS = ("rlcs", "uniform", "dapo", "rlcs_labels")   # rlcs_labels: RLCS as before issue 11 (generator tier
                                                         # labels, fixed mix, one EMA, no pooling / fill_quota)
DEFAULT_SAMPLERS = ("rlcs", "uniform", "dapo")
ROW_KEYS = ("iteration", "rollouts", "rollouts_total", "offline_rollouts", "prompts_rolled_out", "trained_groups",
            "updated", "informative_share", "kept_informative_share", "reward", "reward_rolled", "reward_kept",
            "sampler/mean_reward", "seconds", "expansion", "sampler/expansion_ema", "sampler/generation_rounds",
            "padded_prompts", "verifier_errors", "entropy", "clip_fraction")


# ----------------------------------------------------------------------------------------------
# Configs and the SFT checkpoint


def rl_config(args, sampler: str, seed: int, sft_dir: Path):
    """The demo's RL stage with this sampler, seed and the benchmark's sizes, starting from sft_dir."""
    cfg = demo_stages(args.smoke)[2]
    cfg.seed = seed
    cfg.train.init_from = str(sft_dir)
    cfg.rl.update(sampler="rlcs" if sampler == "rlcs_labels" else sampler, iterations=args.iterations,
                  save_every=args.iterations)
    if sampler == "rlcs_labels":
        cfg.rl.update(offline_difficulty="labels", pilot=False)
        cfg.rl.curriculum.update(fill_quota=False, pool_tiers=False, domain_expansion=False, ema_decay=0.8)
    if args.batch_size:
        cfg.rl.batch_size = args.batch_size
    if args.group_size:
        cfg.rl.group_size = args.group_size
    if args.eval_per_domain:
        cfg.eval.per_domain = args.eval_per_domain
    return cfg


# ----------------------------------------------------------------------------------------------
# Runs


def evaluate_sft(args, sft_dir: Path, out: Path) -> dict:
    """Held-out reward of the starting point (the SFT params), on the same prompts as every run."""
    return evaluate_start(rl_config(args, "uniform", 0, sft_dir), sft_dir, out)


def run_one(args, sampler: str, seed: int, sft_dir: Path, out: Path) -> dict:
    """N RL iterations with one sampler and seed, then the held-out evaluation; cached in result.json."""
    cfg = rl_config(args, sampler, seed, sft_dir)
    r = cfg.rl
    stage_dir = out / "runs" / (f"{sampler}_seed{seed}_it{r.iterations}_b{r.batch_size}_g{r.group_size}"
                                f"_pd{cfg.eval.per_domain}")
    return run_cached(cfg, stage_dir, lambda d, _: {"sampler": sampler, "seed": seed,
                                                    "history": read_history(d, ROW_KEYS)})


# ----------------------------------------------------------------------------------------------
# Summary, plot, RESULTS.md


def nanmean(values) -> float:
    v = np.asarray(values, np.float64)
    return float(np.mean(v[~np.isnan(v)])) if (~np.isnan(v)).any() else float("nan")


def spread(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            "min": float(np.min(v)), "max": float(np.max(v))}


def paired_delta(earlier: list[dict] | None, later: list[dict] | None) -> dict:
    """Paired later - earlier held-out difference over the same prompts (evaluation/stats.paired)."""
    if earlier is None or later is None:
        return {}
    from glmv_jax.evaluation.stats import paired
    keys = ("greedy", "sampled") if all(r["sampled"] is not None for r in earlier + later) else ("greedy",)
    return paired(earlier, later, keys)


def summarize(runs: list[dict], sft_eval: dict) -> dict:
    """Per sampler over seeds: totals and means of the per-iteration numbers (rollouts: the whole bill, RLCS's
    offline pass@k included), held-out reward, and paired held-out deltas (prompt scores averaged over the
    seeds) against the SFT start and against uniform sampling."""
    out = {}
    sft_prompts = seed_mean_prompts([sft_eval])
    uniform = seed_mean_prompts([r["eval"] for r in runs if r["sampler"] == "uniform"]) if any(
        r["sampler"] == "uniform" for r in runs) else None
    for sampler in sorted({r["sampler"] for r in runs}, key=SAMPLERS.index):
        mine = [r for r in runs if r["sampler"] == sampler]
        per_run = []
        for r in mine:
            h = r["history"]
            trained = sum(x["trained_groups"] for x in h)
            informative = sum(x["trained_groups"] * x["kept_informative_share"] for x in h)
            spent = h[-1]["cumulative_rollouts"]
            per_run.append({"rollouts": spent, "offline_rollouts": h[0].get("offline_rollouts", 0),
                            "updates": sum(x["updated"] for x in h),
                            "trained_groups": trained, "informative_trained": informative,
                            "kept_informative_share": informative / max(trained, 1),
                            "rolled_out_informative_share": float(np.mean([x["informative_share"] for x in h])),
                            "train_reward": nanmean([x["reward"] for x in h]),
                            "reward_rolled": nanmean([x.get("reward_rolled", float("nan")) for x in h]),
                            "rollouts_per_informative_group": spent / informative if informative else float("nan"),
                            "heldout_mean": r["eval"]["mean"], "heldout_delta": r["eval"]["mean"] - sft_eval["mean"],
                            "rl_seconds": r["rl_seconds"]})
        domains = sorted(mine[0]["eval"]["accuracy"])
        prompts = seed_mean_prompts([r["eval"] for r in mine])
        out[sampler] = {"seeds": [r["seed"] for r in mine],
                        **{k: spread([p[k] for p in per_run]) for k in per_run[0]},
                        "heldout_by_domain": {d: spread([r["eval"]["accuracy"][d] for r in mine]) for d in domains},
                        "vs_sft": paired_delta(sft_prompts, prompts),
                        "vs_uniform": paired_delta(uniform, prompts) if sampler != "uniform" else {}}
    return out


def plot(runs: list[dict], summary: dict, sft_eval: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.2))
    colors = dict(zip(SAMPLERS, ("tab:red", "tab:blue", "tab:green", "tab:purple")))
    for sampler in summary:
        hs = [r["history"] for r in runs if r["sampler"] == sampler]
        n = min(len(h) for h in hs)
        it = np.arange(1, n + 1)
        for ax, key, style in ((axes[0], "kept_informative_share", "-"), (axes[0], "informative_share", ":"),
                               (axes[1], "cumulative_rollouts", "-")):
            values = np.asarray([[h[i][key] for i in range(n)] for h in hs], np.float64)
            label = sampler if style == "-" else f"{sampler} (rolled out)"
            ax.plot(it, values.mean(0), style, color=colors[sampler], label=label)
            if len(hs) > 1 and style == "-":
                ax.fill_between(it, values.min(0), values.max(0), color=colors[sampler], alpha=0.15)
    axes[0].set(title="informative groups: trained (solid), rolled out (dotted)", xlabel="iteration",
                ylabel="share", ylim=(0, 1.05))
    axes[1].set(title="rollouts spent (responses; RLCS: offline pass@k first)", xlabel="iteration",
                ylabel="cumulative")
    axes[2].errorbar([0], [sft_eval["mean"]], yerr=[sft_eval.get("se", 0.0)], fmt="o", color="tab:gray",
                     capsize=3, label="sft (start)")
    for sampler, s in summary.items():
        mine = [r for r in runs if r["sampler"] == sampler]
        xs = [r["history"][-1]["cumulative_rollouts"] for r in mine]
        axes[2].scatter(xs, [r["eval"]["mean"] for r in mine], color=colors[sampler], alpha=0.35, s=14)
        se = s["vs_sft"].get("greedy_se", 0.0)
        axes[2].errorbar([s["rollouts"]["mean"]], [s["heldout_mean"]["mean"]], yerr=[se], fmt="s",
                         color=colors[sampler], capsize=3, label=f"{sampler} (seed mean, paired SE)")
        axes[2].plot([0, s["rollouts"]["mean"]], [sft_eval["mean"], s["heldout_mean"]["mean"]], "--",
                     color=colors[sampler], alpha=0.5)
    axes[2].set(title="held-out greedy reward vs rollouts spent", xlabel="rollouts (responses generated)",
                ylabel="mean reward over domains")
    domains = sorted(sft_eval["accuracy"]) + ["mean"]
    bars = [("sft (start)", [sft_eval["accuracy"].get(d, sft_eval["mean"]) for d in domains], None, "tab:gray")]
    for sampler, s in summary.items():
        by = {**s["heldout_by_domain"], "mean": s["heldout_mean"]}
        bars.append((sampler, [by[d]["mean"] for d in domains],
                     [[by[d]["mean"] - by[d]["min"] for d in domains], [by[d]["max"] - by[d]["mean"] for d in domains]],
                     colors[sampler]))
    width = 0.8 / len(bars)
    for j, (label, values, err, color) in enumerate(bars):
        axes[3].bar(np.arange(len(domains)) + (j - (len(bars) - 1) / 2) * width, values, width, yerr=err,
                    label=label, color=color, capsize=2)
    axes[3].set_xticks(np.arange(len(domains)), domains, rotation=30, fontsize=8)
    axes[3].set(title="held-out reward (error bars: min-max over seeds)", ylabel="mean reward")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def table(summary: dict, sft_eval: dict) -> str:
    fmt = lambda s, p=2: f"{s['mean']:.{p}f} ± {s['std']:.{p}f}"
    delta = lambda d, key="greedy": (f"{d[key + '_delta']:+.3f} ± {d[key + '_se']:.3f}" if key + "_delta" in d
                                     else "n/a")
    lines = ["| sampler | updates | groups trained | informative among trained | informative among rolled out | "
             "rollouts spent (offline) | rollouts per informative group | reward rolled out / trained | "
             "held-out greedy | vs SFT greedy (paired) | vs uniform greedy (paired) | vs SFT sampled | RL wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for sampler, s in summary.items():
        lines.append(f"| {sampler} | {fmt(s['updates'], 1)} | {fmt(s['trained_groups'], 0)} | "
                     f"{fmt(s['kept_informative_share'])} | {fmt(s['rolled_out_informative_share'])} | "
                     f"{fmt(s['rollouts'], 0)} ({s['offline_rollouts']['mean']:.0f}) | "
                     f"{fmt(s['rollouts_per_informative_group'], 1)} | "
                     f"{s['reward_rolled']['mean']:.3f} / {s['train_reward']['mean']:.3f} | "
                     f"{fmt(s['heldout_mean'], 3)} | {delta(s['vs_sft'])} | "
                     f"{delta(s['vs_uniform']) if sampler != 'uniform' else '-'} | {delta(s['vs_sft'], 'sampled')} | "
                     f"{fmt(s['rl_seconds'], 0)} |")
    domains = sorted(sft_eval["accuracy"])
    lines += ["", "| held-out reward | " + " | ".join(domains) + " | mean |", "|---|" + "---|" * (len(domains) + 1),
              "| sft (start) | " + " | ".join(f"{sft_eval['accuracy'][d]:.2f}" for d in domains)
              + f" | {sft_eval['mean']:.3f} |"]
    for sampler, s in summary.items():
        lines.append(f"| {sampler} | " + " | ".join(f"{s['heldout_by_domain'][d]['mean']:.2f}" for d in domains)
                     + f" | {s['heldout_mean']['mean']:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sft", help="SFT stage directory or demo work directory (default: train one)")
    ap.add_argument("--out", help="output directory (default runs/rlcs_bench-<date-time>)")
    ap.add_argument("--iterations", type=int, default=8, help="GRPO updates per run")
    ap.add_argument("--batch-size", type=int, default=0, help="groups trained per update (default: the demo's)")
    ap.add_argument("--group-size", type=int, default=0, help="responses per prompt (default: the demo's)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--samplers", default=",".join(DEFAULT_SAMPLERS),
                    help=f"comma-separated, from {','.join(SAMPLERS)}")
    ap.add_argument("--eval-per-domain", type=int, default=0, help="held-out prompts per domain (default: the demo's)")
    ap.add_argument("--smoke", action="store_true", help="the demo's seconds-long smoke settings (tests)")
    ap.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    bad = [s for s in args.samplers if s not in SAMPLERS]
    if bad or not args.samplers:
        ap.error(f"--samplers must name some of {SAMPLERS}, got {args.samplers}")
    if args.iterations < 1 or not args.seeds or args.batch_size < 0 or args.group_size < 0:
        ap.error("need --iterations >= 1, at least one seed, sizes >= 0")
    if args.group_size == 1:
        ap.error("--group-size must be >= 2 (a group of one has no reward variance)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out or f"runs/rlcs_bench-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    start, load_start = time.perf_counter(), load_average()
    sft_dir = prepare_sft(args, out)
    sft_eval = evaluate_sft(args, sft_dir, out)
    # the first run in the process pays the compiles every sampler shares: rotate the order over seeds
    orders = [args.samplers[k % len(args.samplers):] + args.samplers[:k % len(args.samplers)]
              for k in range(len(args.seeds))]
    runs = [run_one(args, sampler, seed, sft_dir, out) for seed, order in zip(args.seeds, orders) for sampler in order]
    summary = summarize(runs, sft_eval)
    rl = rl_config(args, args.samplers[0], args.seeds[0], sft_dir).rl
    settings = {"iterations": args.iterations, "batch_size": rl.batch_size, "group_size": rl.group_size,
                "seeds": args.seeds, "max_new_tokens": rl.max_new_tokens, "prompts_per_domain": rl.prompts_per_domain,
                "prompt_tiers": plain(rl.prompt_tiers), "dapo_max_rounds": rl.dapo_max_rounds,
                "offline": {k: plain(rl.get(k)) for k in ("offline_difficulty", "offline_samples", "offline_prompts",
                                                          "pilot", "pilot_min_informative")},
                "grpo": plain(rl.grpo),
                "curriculum": plain(rl.curriculum), "sft": str(Path(args.sft).resolve()) if args.sft else str(sft_dir),
                "eval": plain(rl_config(args, "uniform", 0, sft_dir).eval), "sampler_order": orders}
    report = {"settings": settings, "sft_eval": sft_eval, "summary": summary, "runs": runs,
              "wall_seconds": time.perf_counter() - start, "load_start": load_start, "load_end": load_average(),
              "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"}
    (out / "rlcs.json").write_text(json.dumps(report, indent=1))
    plot(runs, summary, sft_eval, out / "rlcs.png")
    text = table(summary, sft_eval)
    print(text)
    print(f"json: {out / 'rlcs.json'}  plot: {out / 'rlcs.png'}")
    if not args.no_results:
        append_results(report, text, out / "rlcs.png")
    return report


def lean(report: dict) -> dict:
    """The report without the per-prompt held-out rows (kept in --out's rlcs.json; the summary holds the paired
    deltas computed from them), for the copy committed under benchmarks/plots/."""
    drop = lambda e: {k: v for k, v in e.items() if k != "prompts"}
    return {**report, "sft_eval": drop(report["sft_eval"]),
            "runs": [{**r, "eval": drop(r["eval"])} for r in report["runs"]]}


def append_results(report: dict, text: str, png: Path) -> None:
    import jax
    s = report["settings"]
    run_seconds = sum(r["rl_seconds"] + r["eval_seconds"] for r in report["runs"])
    plot_ref = png
    if png.stat().st_size < 200_000:
        PLOTS.mkdir(exist_ok=True)
        plot_ref = PLOTS / f"rlcs-{datetime.datetime.now():%Y%m%d-%H%M}.png"
        shutil.copy(png, plot_ref)
        lean_json = json.dumps(lean(report), separators=(",", ":"))
        (PLOTS / plot_ref.name.replace(".png", ".json")).write_text(lean_json)
        plot_ref = plot_ref.relative_to(RESULTS.parent)
    section = (f"\n## RLCS vs uniform vs DAPO (benchmarks/rlcs.py), {report['date']}\n"
               f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} (cpu); uptime at start: "
               f"`{report['load_start']}`, at end: `{report['load_end']}`; this invocation {report['wall_seconds']:.0f} s, "
               f"RL + held-out eval summed over all runs {run_seconds:.0f} s (runs finished by an earlier invocation "
               f"with the same --out are reused); sampler order per seed {s['sampler_order']} (the first run in a "
               f"process pays the compiles the others reuse)\n\n"
               f"From the same SFT checkpoint ({s['sft']}), per sampler and seed {s['seeds']}: {s['iterations']} GRPO "
               f"updates of B={s['batch_size']} groups x G={s['group_size']} responses (max {s['max_new_tokens']} "
               f"new tokens, the demo's RL settings; pool {s['prompts_per_domain']} prompts/domain from tiers "
               f"{s['prompt_tiers']}; DAPO max {s['dapo_max_rounds']} rounds; RLCS offline pass and pilot "
               f"{s['offline']}; curriculum {s['curriculum']}), then greedy held-out reward on "
               f"{s['eval']['per_domain']} prompts/domain. Values: mean ± std over seeds (std 0 for one seed); paired "
               f"deltas: mean ± SE over prompts of the seed-averaged per-prompt scores.\n\n"
               f"{text}\n\nPlot: {plot_ref}\n")
    with RESULTS.open("a") as f:
        f.write(section)


if __name__ == "__main__":
    from experiments.run import enable_compilation_cache
    enable_compilation_cache()
    main()
