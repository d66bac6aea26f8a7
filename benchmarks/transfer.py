"""Cross-domain transfer of RL (the paper's Fig. 6) at micro scale: from one SFT checkpoint, RL on each single
domain and on the mix of all with equal budgets, then the paired held-out evaluation of every domain.

Every row is the demo's RL stage (experiments/configs/demo.py, run_rl: no second RL loop) from the same SFT
params, the same seeds, the same number of GRPO updates and the same rollouts per update (B groups x G
responses; RLCS's expansion is off so no row rolls out more than another; its offline pass measures
--offline-prompts prompts per domain, billed to no row's update budget; the pilot mix is off so "mix-all"
trains every domain, as the paper's mix does). Rows: `rl.domains = [d]` for each domain d, and "mix-all"
(every domain). Columns: greedy held-out reward per domain on the same prompts as the SFT start (150 per
domain by default) and their unweighted mean. A cell is the paired RL - SFT difference over those prompts,
the per-prompt scores averaged over the seeds first, with its standard error (evaluation/stats.paired).
Writes transfer.json and transfer.png (heat map, SE in every cell) to --out and appends a table to
benchmarks/RESULTS.md.

    python -m benchmarks.transfer                         # trains the demo's pretrain + SFT first (~6 min)
    python -m benchmarks.transfer --sft runs/demo-<date>/1_sft --seeds 0,1 --iterations 30

A run directory holding a finished run (result.json) is reused, so a rerun with the same --out resumes.
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

MIX = "mix-all"


def rl_config(args, row: str, seed: int, sft_dir: Path):
    """The demo's RL stage for one matrix row (a domain or MIX), seed and the benchmark's sizes."""
    cfg = demo_stages(args.smoke)[2]
    cfg.seed = seed
    cfg.train.init_from = str(sft_dir)
    cfg.rl.update(iterations=args.iterations, save_every=args.iterations, pilot=False,
                  offline_prompts=args.offline_prompts, domains=None if row == MIX else [row])
    cfg.rl.curriculum.expansion = False           # B prompts rolled out per update in every row: equal budgets
    cfg.eval.update(samples=0, per_domain=args.eval_per_domain or cfg.eval.per_domain)
    return cfg


def run_row(args, row: str, seed: int, sft_dir: Path, out: Path) -> dict:
    """One RL run and its held-out evaluation, cached in its result.json."""
    cfg = rl_config(args, row, seed, sft_dir)

    def describe(stage_dir: Path, _) -> dict:
        history = read_history(stage_dir)
        return {"row": row, "seed": seed, "rollouts": int(sum(h["rollouts"] for h in history)),
                "updates": int(sum(h["updated"] for h in history)),
                "informative_trained": float(np.mean([h["kept_informative_share"] for h in history]))}

    stage_dir = out / "runs" / f"{row}_seed{seed}_it{cfg.rl.iterations}_pd{cfg.eval.per_domain}"
    return run_cached(cfg, stage_dir, describe)


def evaluate_sft(args, sft_dir: Path, out: Path) -> dict:
    """Greedy held-out reward of the SFT start on the prompts every row is evaluated on."""
    return evaluate_start(rl_config(args, MIX, 0, sft_dir), sft_dir, out)


def transfer_matrix(sft_prompts: list[dict], runs: list[dict]) -> dict:
    """{row: {column: {"delta", "se", "n"}}}: per row (training domain or MIX) the paired RL - SFT greedy
    difference per evaluation domain and "mean" (unweighted over domains), per-prompt scores averaged over
    the row's seeds first. sft_prompts / each run's eval["prompts"]: rows {"id", "domain", "greedy"}."""
    from glmv_jax.evaluation.stats import paired
    matrix = {}
    rows = sorted({r["row"] for r in runs}, key=lambda x: (x == MIX, x))
    for row in rows:
        later = seed_mean_prompts([r["eval"] for r in runs if r["row"] == row])
        result = paired(sft_prompts, later, ("greedy",))
        cells = {d: {"delta": e["greedy_delta"], "se": e["greedy_se"], "n": e["n"]}
                 for d, e in sorted(result["domains"].items())}
        cells["mean"] = {"delta": result["greedy_delta"], "se": result["greedy_se"],
                         "n": sum(e["n"] for e in cells.values())}
        matrix[row] = cells
    return matrix


def table(matrix: dict, sft_eval: dict) -> str:
    columns = list(next(iter(matrix.values())))
    lines = ["| RL on \\ eval | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|",
             "| SFT (start) | " + " | ".join(f"{sft_eval['accuracy'][c]:.3f}" if c != "mean" else
                                              f"{sft_eval['mean']:.3f}" for c in columns) + " |"]
    for row, cells in matrix.items():
        fmt = lambda c: (f"**{c['delta']:+.3f} ± {c['se']:.3f}**" if abs(c["delta"]) > 2 * c["se"] > 0
                         else f"{c['delta']:+.3f} ± {c['se']:.3f}")
        lines.append(f"| {row} | " + " | ".join(fmt(cells[c]) for c in columns) + " |")
    return "\n".join(lines)


def plot(matrix: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, columns = list(matrix), list(next(iter(matrix.values())))
    delta = np.array([[matrix[r][c]["delta"] for c in columns] for r in rows])
    limit = max(float(np.nanmax(np.abs(delta))), 1e-3)
    fig, ax = plt.subplots(figsize=(1.3 * len(columns) + 2, 0.62 * len(rows) + 1.6))
    image = ax.imshow(delta, cmap="RdBu", vmin=-limit, vmax=limit)
    for i, r in enumerate(rows):
        for j, c in enumerate(columns):
            cell = matrix[r][c]
            ax.text(j, i, f"{cell['delta']:+.3f}\n±{cell['se']:.3f}", ha="center", va="center", fontsize=8,
                    fontweight="bold" if abs(cell["delta"]) > 2 * cell["se"] > 0 else "normal")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("held-out evaluation domain (greedy, paired RL - SFT)")
    ax.set_ylabel("RL training domain")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sft", help="SFT stage directory or demo work directory (default: train one)")
    ap.add_argument("--out", help="output directory (default runs/transfer-<date-time>)")
    ap.add_argument("--iterations", type=int, default=30, help="GRPO updates per run")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    ap.add_argument("--rows", default="", help="comma-separated training rows (default: every domain and mix-all)")
    ap.add_argument("--eval-per-domain", type=int, default=0, help="held-out prompts per domain (default: the demo's)")
    ap.add_argument("--offline-prompts", type=int, default=24, help="prompts per domain in RLCS's offline pass")
    ap.add_argument("--smoke", action="store_true", help="the demo's seconds-long smoke settings (tests)")
    ap.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    domains = list(demo_stages(args.smoke)[2].data.domains)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()] or domains + [MIX]
    bad = [r for r in args.rows if r not in domains + [MIX]]
    if bad:
        ap.error(f"--rows must name some of {domains + [MIX]}, got {bad}")
    if args.iterations < 1 or not args.seeds or args.offline_prompts < 0:
        ap.error("need --iterations >= 1, at least one seed and --offline-prompts >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out or f"runs/transfer-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    start, load_start = time.perf_counter(), load_average()
    sft_dir = prepare_sft(args, out)
    sft_eval = evaluate_sft(args, sft_dir, out)
    runs = [run_row(args, row, seed, sft_dir, out) for seed in args.seeds for row in args.rows]
    matrix = transfer_matrix(sft_eval["prompts"], runs)
    cfg = rl_config(args, MIX, args.seeds[0], sft_dir)
    settings = {"iterations": args.iterations, "seeds": args.seeds, "rows": args.rows,
                "batch_size": cfg.rl.batch_size, "group_size": cfg.rl.group_size, "lr": cfg.optimizer.lr,
                "temperature": cfg.rl.temperature, "max_new_tokens": cfg.rl.max_new_tokens,
                "prompts_per_domain": cfg.rl.prompts_per_domain, "offline_prompts": args.offline_prompts,
                "eval_per_domain": cfg.eval.per_domain, "sft": str(Path(args.sft).resolve()) if args.sft else str(sft_dir)}
    report = {"settings": settings, "matrix": matrix, "sft_eval": {k: v for k, v in sft_eval.items() if k != "prompts"},
              "runs": [{k: v for k, v in r.items() if k != "eval"} | {"heldout": r["eval"]["accuracy"]} for r in runs],
              "wall_seconds": time.perf_counter() - start, "load_start": load_start, "load_end": load_average(),
              "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"}
    (out / "transfer.json").write_text(json.dumps(report, indent=1))
    title = (f"RL transfer: paired greedy held-out delta vs SFT\n{args.iterations} updates x "
             f"{cfg.rl.batch_size}x{cfg.rl.group_size} rollouts per row, seeds {args.seeds}")
    plot(matrix, out / "transfer.png", title)
    text = table(matrix, sft_eval)
    print(text)
    print(f"json: {out / 'transfer.json'}  plot: {out / 'transfer.png'}")
    if not args.no_results:
        append_results(report, text, out / "transfer.png")
    return report


def append_results(report: dict, text: str, png: Path) -> None:
    s = report["settings"]
    run_seconds = sum(r["rl_seconds"] + r["eval_seconds"] for r in report["runs"])
    body = (f"This invocation {report['wall_seconds']:.0f} s (RL + eval summed over runs {run_seconds:.0f} s; finished "
            f"runs of an earlier invocation with the same --out are reused). From one SFT checkpoint ({s['sft']}), "
            f"per row and seed {s['seeds']}: {s['iterations']} GRPO updates of B={s['batch_size']} groups x "
            f"G={s['group_size']} (RLCS without expansion: equal rollouts in every row; lr {s['lr']}, temperature "
            f"{s['temperature']}, {s['max_new_tokens']} new tokens, pool {s['prompts_per_domain']} prompts per "
            f"domain, offline pass on {s['offline_prompts']} per domain), then greedy held-out reward on the same "
            f"{s['eval_per_domain']} prompts per domain as the SFT start. Cells: paired RL - SFT (per-prompt scores "
            f"averaged over the seeds) ± SE; bold: |delta| > 2 SE.\n\n{text}")
    publish("transfer", "RL transfer across domains (benchmarks/transfer.py, the paper's Fig. 6)", report, body, png)


if __name__ == "__main__":
    from experiments.run import enable_compilation_cache
    enable_compilation_cache()
    main()
