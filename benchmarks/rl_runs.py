"""Plumbing the RL benchmarks share (rlcs.py, transfer.py, weak_verifier.py): the demo's stage configs, the SFT
checkpoint every run starts from, RL runs cached in their result.json, held-out evaluations with per-prompt
rows, seed-averaged prompt scores, and the machine's load for RESULTS.md."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np

RESULTS = Path(__file__).with_name("RESULTS.md")
PLOTS = Path(__file__).with_name("plots")


def demo_stages(smoke: bool):
    from experiments.configs import demo
    return demo.get_config("smoke" if smoke else None).stages


def find_sft_stage(path: Path) -> Path:
    """A stage directory (holding checkpoints/) or a pipeline work directory (its `<i>_sft` stage)."""
    if (path / "checkpoints").is_dir():
        return path
    stages = sorted(d for d in path.glob("*_sft") if (d / "checkpoints").is_dir()) if path.is_dir() else []
    if not stages:
        raise FileNotFoundError(f"--sft {path}: neither a stage directory with checkpoints/ nor a pipeline "
                                f"work directory with an <i>_sft/checkpoints stage")
    return stages[-1]


def prepare_sft(args, out: Path) -> Path:
    """The SFT stage directory every sampler starts from: a copy of --sft (the source is never written), or
    the demo's pretrain + SFT stages trained into out/sft_run."""
    if args.sft:
        source = find_sft_stage(Path(args.sft))
        target = out / "sft"
        if not target.exists():
            shutil.copytree(source, target)
        return target
    from experiments.run import run_pipeline
    pretrain, sft, _ = demo_stages(args.smoke)
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(stages=[pretrain, sft], eval_after=[], report=False))
    run_pipeline(cfg, str(out / "sft_run"))
    return out / "sft_run" / "1_sft"


def check_tokenizer(sft_dir: Path, stage_dir: Path) -> None:
    """The SFT run's saved tokenizer must equal the suite tokenizer this code builds (same token ids)."""
    saved, current = sft_dir / "tokenizer.model", stage_dir / "tokenizer.model"
    if saved.is_file() and current.is_file() and saved.read_bytes() != current.read_bytes():
        raise ValueError(f"{saved} differs from the suite tokenizer the current code builds ({current}): the SFT "
                         f"checkpoint was trained with other token ids; retrain it (run without --sft)")


def read_history(stage_dir: Path, keys=None) -> list[dict]:
    """Per-iteration rows of logs/metrics.jsonl (the last row of an iteration wins, as after a resume), with
    `keys` only (None: every key)."""
    rows = {}
    with open(stage_dir / "logs" / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            rows[int(row["iteration"])] = dict(row) if keys is None else {k: row[k] for k in keys if k in row}
    history = [rows[i] for i in sorted(rows)]
    offline = history[0].get("offline_rollouts", 0) if history else 0     # RLCS's pass@k, billed up front
    cumulative = offline + np.cumsum([h["rollouts"] for h in history])
    for h, c in zip(history, cumulative):
        h["cumulative_rollouts"] = int(c)
    return history


def held_out(cfg, stage_dir: Path, params) -> dict:
    from experiments.run import evaluate_stage
    result = evaluate_stage(cfg, str(stage_dir), params)
    acc = result["accuracy"]
    return {"accuracy": acc, "mean": float(np.mean(list(acc.values()))), "format_rate": result["format_rate"],
            "n": result["n"], "se": result["summary"]["mean"].get("greedy_se", float("nan")),
            "prompts": [{k: row.get(k) for k in ("id", "domain", "greedy", "sampled")} for row in result["prompts"]]}


def plain(value):
    """ConfigDicts (and what they hold) as JSON-able dicts."""
    return value.to_dict() if hasattr(value, "to_dict") else value


def seed_mean_prompts(evals: list[dict]) -> list[dict] | None:
    """Per held-out prompt (by id) its greedy / sampled score averaged over evaluations (seeds); None when an
    evaluation kept no per-prompt rows (result.json of older code)."""
    if any("prompts" not in e for e in evals):
        return None
    rows: dict[str, list[dict]] = {}
    for e in evals:
        for row in e["prompts"]:
            rows.setdefault(row["id"], []).append(row)
    mean = lambda xs: float(np.mean(xs)) if all(x is not None for x in xs) else None
    return [{"id": i, "domain": rs[0]["domain"], "greedy": mean([r["greedy"] for r in rs]),
             "sampled": mean([r.get("sampled") for r in rs])} for i, rs in rows.items()]


def load_average() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg())


def evaluate_start(cfg, sft_dir: Path, out: Path) -> dict:
    """Held-out reward of the starting point (the SFT params under `cfg`, a benchmark's RL stage config), on
    the prompts every run is evaluated on; cached in out/sft_eval_pd<per_domain>."""
    from glmv_jax.train.experiment import initial_params, param_shardings, setup
    stage_dir = out / f"sft_eval_pd{cfg.eval.per_domain}"
    exp = setup(cfg, str(stage_dir))
    check_tokenizer(sft_dir, stage_dir)
    return held_out(cfg, stage_dir, initial_params(exp, *param_shardings(exp)))


def run_cached(cfg, stage_dir: Path, describe: Callable[[Path, dict], dict]) -> dict:
    """run_stage(cfg) into stage_dir, then the held-out evaluation of its final params; the result, with
    describe(stage_dir, stage summary)'s entries, cached in stage_dir/result.json (a finished run is reused)."""
    from experiments.run import run_stage
    done = stage_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    summary = run_stage(cfg, str(stage_dir))
    rl_seconds, t0 = time.perf_counter() - t0, time.perf_counter()
    result = {**describe(stage_dir, summary), "eval": held_out(cfg, stage_dir, summary["state"].params),
              "rl_seconds": rl_seconds, "eval_seconds": time.perf_counter() - t0}
    done.write_text(json.dumps(result, indent=1))
    return result


def publish(name: str, heading: str, report: dict, body: str, png: Path) -> None:
    """Copy the plot and the report (JSON) to plots/<name>-<stamp>.* and append a RESULTS.md section: the
    heading with the report's date, the machine with its load at start and end, `body`, the plot's path."""
    import jax
    PLOTS.mkdir(exist_ok=True)
    stamp = f"{datetime.datetime.now():%Y%m%d-%H%M}"
    shutil.copy(png, PLOTS / f"{name}-{stamp}.png")
    (PLOTS / f"{name}-{stamp}.json").write_text(json.dumps(report, separators=(",", ":")))
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} (cpu); uptime at start: "
               f"`{report['load_start']}`, at end: `{report['load_end']}`")
    with open(RESULTS, "a") as f:
        f.write(f"\n## {heading}, {report['date']}\n{machine}\n\n{body}\n\nPlot: plots/{name}-{stamp}.png\n")
