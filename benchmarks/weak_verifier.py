"""The weak-verifier collapse (the paper's Sec. 5.2) at micro scale, and the reward-health guard against it.

Three RL runs of the demo's RL stage (run_rl) from one SFT checkpoint, same seed, same settings:
- "real": every domain rewarded by its real verifier;
- "weak": one domain (--domain, default counting) rewarded by a weakened verifier (--verifier, default
  counting_upper_bound: an over-count is paid, rewards/weak.py), the guard watching but not acting
  (rl.health.action = "flag");
- "weak+guard": the same with the guard acting (--action, default "pause": a flagged domain leaves the
  curriculum).
Every run has the reward-health monitor on (rl/health.py): each --every iterations a fixed probe set of
--probe-per-domain prompts per domain (split "probe", --probe-samples responses each) is scored by the real
verifiers. Recorded per run: per domain the training reward (over all rolled-out groups) and the probe
reward at every check, the divergence of the hacked domain with its SE, which domains were flagged and when,
and the paired greedy held-out reward per domain against the SFT start (real verifiers; 150 prompts per
domain by default). The comparison the guard has to win: the other domains' paired held-out mean in
"weak+guard" against "real" (paired over the same prompts). Writes weak_verifier.json and weak_verifier.png
(one panel per domain: training reward and probe reward of each run) to --out and appends to
benchmarks/RESULTS.md.

    python -m benchmarks.weak_verifier --sft runs/demo-<date>/1_sft
    python -m benchmarks.weak_verifier                       # trains the demo's pretrain + SFT first
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.rl_runs import (demo_stages, evaluate_start, load_average, prepare_sft, publish,  # noqa: E402
                                read_history, run_cached, seed_mean_prompts)

RUNS = ("real", "weak", "weak+guard")
COLORS = {"real": "tab:blue", "weak": "tab:red", "weak+guard": "tab:green"}


def rl_config(args, run: str, seed: int, sft_dir: Path):
    """The demo's RL stage for one of RUNS."""
    cfg = demo_stages(args.smoke)[2]
    cfg.seed = seed
    cfg.train.init_from = str(sft_dir)
    cfg.rl.update(iterations=args.iterations, save_every=args.iterations)
    if args.lr:
        cfg.optimizer.lr = args.lr
    cfg.rl.health.update(every=args.every, probe_per_domain=args.probe_per_domain, probe_samples=args.probe_samples,
                         action=args.action if run == "weak+guard" else "flag")
    if run != "real":
        cfg.rl.reward_overrides = {args.domain: args.verifier}
    cfg.eval.update(samples=0, per_domain=args.eval_per_domain or cfg.eval.per_domain)
    return cfg


def run_one(args, run: str, seed: int, sft_dir: Path, out: Path) -> dict:
    """One of RUNS with one seed and its held-out evaluation, cached in its result.json."""
    cfg = rl_config(args, run, seed, sft_dir)
    stage_dir = out / "runs" / f"{run.replace('+', '_')}_seed{seed}_it{args.iterations}"
    return run_cached(cfg, stage_dir, lambda d, summary: {"run": run, "seed": seed, "history": read_history(d),
                                                          "health": summary["reward_health"]})


def evaluate_sft(args, sft_dir: Path, out: Path) -> dict:
    return evaluate_start(rl_config(args, "real", 0, sft_dir), sft_dir, out)


def paired_subset(earlier: list[dict], later: list[dict], domains) -> dict:
    """evaluation/stats.paired over the prompts of `domains` only (greedy)."""
    from glmv_jax.evaluation.stats import paired
    keep = lambda rows: [r for r in rows if r["domain"] in domains]
    return paired(keep(earlier), keep(later), ("greedy",))


def hack_summary(run: dict, domain: str) -> dict:
    """The hacked domain in one run: its probe reward under the training verifier and under the real one at
    the baseline (the starting policy) and the last check, the last divergence with its SE (rl/health.py),
    the flags and after how many checks the domain was flagged."""
    checks = run["health"]["checks"]
    first, last = checks[0], checks[-1]
    row = next(h for h in reversed(run["history"]) if f"health/{domain}/divergence" in h)
    flagged = run["health"]["flagged"]
    iterations = [c["iteration"] for c in checks]
    return {"seed": run["seed"], "trained_first": float(np.mean(first["probe_trained"][domain])),
            "trained_last": float(np.mean(last["probe_trained"][domain])),
            "probe_first": float(np.mean(first["probe"][domain])), "probe_last": float(np.mean(last["probe"][domain])),
            "divergence": row[f"health/{domain}/divergence"], "divergence_se": row[f"health/{domain}/divergence_se"],
            "checks": iterations, "flagged": flagged,
            "checks_to_flag": iterations.index(flagged[domain]) if domain in flagged else None}


def summarize(args, runs: dict, sft_eval: dict) -> dict:
    """Per run name: per seed the hacked domain's summary and paired held-out deltas; over seeds the paired
    deltas of the seed-averaged per-prompt scores (vs SFT, and the other domains vs the real run)."""
    domains = sorted(sft_eval["accuracy"])
    others = [d for d in domains if d != args.domain]
    sft_prompts = sft_eval["prompts"]
    pooled = {name: seed_mean_prompts([r["eval"] for r in rs]) for name, rs in runs.items()}
    out = {}
    for name, rs in runs.items():
        per_seed = [{**hack_summary(r, args.domain),
                     "vs_sft": paired_subset(sft_prompts, r["eval"]["prompts"], domains),
                     "others_vs_real": paired_subset(real["eval"]["prompts"], r["eval"]["prompts"], others)
                     if name != "real" else None, "rl_seconds": r["rl_seconds"]}
                    for r, real in zip(rs, runs["real"])]
        out[name] = {"per_seed": per_seed, "vs_sft": paired_subset(sft_prompts, pooled[name], domains),
                     "others_vs_sft": paired_subset(sft_prompts, pooled[name], others),
                     "others_vs_real": paired_subset(pooled["real"], pooled[name], others) if name != "real" else None}
    return out


def smooth(values, width: int = 5) -> np.ndarray:
    v = np.asarray(values, np.float64)
    out = np.full(len(v), np.nan)
    for i in range(len(v)):
        window = v[max(0, i - width + 1):i + 1]
        window = window[np.isfinite(window)]
        out[i] = window.mean() if len(window) else np.nan
    return out


def plot(args, runs: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    domains = sorted(runs["real"][0]["health"]["checks"][0]["train"])
    fig, axes = plt.subplots(1, len(domains), figsize=(3.1 * len(domains), 3.4), sharey=True)
    for ax, d in zip(np.atleast_1d(axes), domains):
        for name, rs in runs.items():
            for k, run in enumerate(rs):
                label = (lambda text: text if k == 0 else None)
                h = run["history"]
                ax.plot([x["iteration"] for x in h], smooth([x.get(f"reward_rolled/{d}", np.nan) for x in h]),
                        color=COLORS[name], lw=1.0, alpha=0.8, label=label(f"{name}: training reward (pool)"))
                checks = run["health"]["checks"]
                ax.plot([c["iteration"] for c in checks], [np.mean(c["probe"][d]) for c in checks], "o--",
                        color=COLORS[name], ms=3, lw=0.8, label=label(f"{name}: real-verifier probe"))
                if d in run["health"]["flagged"]:
                    ax.axvline(run["health"]["flagged"][d], color=COLORS[name], ls=":", lw=1)
        ax.set_title(d + (f" ({args.verifier})" if d == args.domain else ""), fontsize=9)
        ax.set_xlabel("iteration")
    np.atleast_1d(axes)[0].set_ylabel("reward")
    np.atleast_1d(axes)[0].legend(fontsize=6, loc="lower left")
    fig.suptitle("Weak-verifier experiment: training reward (solid, 5-iteration mean) vs real-verifier probe "
                 "reward (dashed); dotted: guard flag", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(args, summary: dict) -> str:
    fmt = lambda d: f"{d['greedy_delta']:+.3f} ± {d['greedy_se']:.3f}" if d else "-"
    lines = [f"| run | seed | {args.domain} probe, training verifier: start → end | {args.domain} probe, real "
             f"verifier: start → end | divergence ± SE (end) | flagged (iteration; checks after the start) | "
             f"{args.domain} held-out vs SFT | other domains held-out vs SFT | other domains vs real run |",
             "|---" * 9 + "|"]
    for name, s in summary.items():
        for h in s["per_seed"]:
            flags = ", ".join(f"{d} @ {i}" for d, i in sorted(h["flagged"].items())) or "none"
            if h["checks_to_flag"] is not None:
                flags += f" ({h['checks_to_flag']})"
            others = paired_others(h["vs_sft"], args.domain)
            lines.append(f"| {name} | {h['seed']} | {h['trained_first']:.3f} → {h['trained_last']:.3f} | "
                         f"{h['probe_first']:.3f} → {h['probe_last']:.3f} | {h['divergence']:+.3f} ± "
                         f"{h['divergence_se']:.3f} | {flags} | {fmt(h['vs_sft']['domains'][args.domain])} | "
                         f"{others} | {fmt(h['others_vs_real'])} |")
        lines.append(f"| {name} | seed mean | | | | | {fmt(s['vs_sft']['domains'][args.domain])} | "
                     f"{fmt(s['others_vs_sft'])} | {fmt(s['others_vs_real'])} |")
    return "\n".join(lines)


def paired_others(vs_sft: dict, hacked: str) -> str:
    """The unweighted mean of the other domains' paired deltas with its SE (evaluation/stats.combine)."""
    from glmv_jax.evaluation.stats import combine
    mean, se = combine({d: (e["greedy_delta"], e["greedy_se"]) for d, e in vs_sft["domains"].items() if d != hacked})
    return f"{mean:+.3f} ± {se:.3f}"


def parse_args(argv=None):
    from glmv_jax.rewards.weak import WEAKENED
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sft", help="SFT stage directory or demo work directory (default: train one)")
    ap.add_argument("--out", help="output directory (default runs/weak_verifier-<date-time>)")
    ap.add_argument("--domain", default="counting", help="the domain whose verifier is weakened")
    ap.add_argument("--verifier", default="counting_upper_bound", choices=sorted(WEAKENED))
    ap.add_argument("--action", default="pause", choices=("downweight", "pause"), help="the guard's action")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds of the RL stage (same SFT start)")
    ap.add_argument("--lr", type=float, default=0.0, help="RL learning rate (default: the demo's)")
    ap.add_argument("--every", type=int, default=5, help="iterations between reward-health checks")
    ap.add_argument("--probe-per-domain", type=int, default=24)
    ap.add_argument("--probe-samples", type=int, default=6)
    ap.add_argument("--eval-per-domain", type=int, default=0, help="held-out prompts per domain (default: the demo's)")
    ap.add_argument("--smoke", action="store_true", help="the demo's seconds-long smoke settings (tests)")
    ap.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    domains = list(demo_stages(args.smoke)[2].data.domains)
    if args.domain not in domains:
        ap.error(f"--domain must be one of {domains}")
    if args.iterations < 2 * args.every or args.every < 1:
        ap.error("need --every >= 1 and --iterations >= 2 * --every (the guard compares checks)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out or f"runs/weak_verifier-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    start, load_start = time.perf_counter(), load_average()
    sft_dir = prepare_sft(args, out)
    sft_eval = evaluate_sft(args, sft_dir, out)
    runs = {name: [run_one(args, name, seed, sft_dir, out) for seed in args.seeds] for name in RUNS}
    summary = summarize(args, runs, sft_eval)
    cfg = rl_config(args, "weak+guard", args.seeds[0], sft_dir)
    settings = {"domain": args.domain, "verifier": args.verifier, "action": args.action, "seeds": args.seeds,
                "iterations": args.iterations, "lr": cfg.optimizer.lr, "health": cfg.rl.health.to_dict(),
                "batch_size": cfg.rl.batch_size, "group_size": cfg.rl.group_size, "temperature": cfg.rl.temperature,
                "eval_per_domain": cfg.eval.per_domain,
                "sft": str(Path(args.sft).resolve()) if args.sft else str(sft_dir)}
    report = {"settings": settings, "summary": summary, "sft_accuracy": sft_eval["accuracy"],
              "heldout": {n: [r["eval"]["accuracy"] for r in rs] for n, rs in runs.items()},
              "wall_seconds": time.perf_counter() - start, "load_start": load_start, "load_end": load_average(),
              "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"}
    (out / "weak_verifier.json").write_text(json.dumps(report, indent=1))
    plot(args, runs, out / "weak_verifier.png")
    text = table(args, summary)
    print(text)
    print(f"json: {out / 'weak_verifier.json'}  plot: {out / 'weak_verifier.png'}")
    if not args.no_results:
        append_results(report, text, out / "weak_verifier.png")
    return report


def append_results(report: dict, text: str, png: Path) -> None:
    s = report["settings"]
    body = (f"{report['wall_seconds']:.0f} s. From one SFT checkpoint ({s['sft']}), RL seeds {s['seeds']}, "
            f"{s['iterations']} GRPO updates of B={s['batch_size']} x G={s['group_size']} at lr {s['lr']}, "
            f"temperature {s['temperature']}; {s['domain']} rewarded by `{s['verifier']}` in the weak runs; guard "
            f"every {s['health']['every']} iterations on {s['health']['probe_per_domain']} probe prompts per domain x "
            f"{s['health']['probe_samples']} samples, action `{s['action']}` in weak+guard. Held-out: greedy, "
            f"{s['eval_per_domain']} prompts per domain, real verifiers, paired.\n\n{text}")
    publish("weak_verifier", "Weak verifier and the reward-health guard (benchmarks/weak_verifier.py, the paper's "
            "Sec. 5.2)", report, body, png)


if __name__ == "__main__":
    from experiments.run import enable_compilation_cache
    enable_compilation_cache()
    main()
