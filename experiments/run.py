"""The one entry point: `python -m experiments.run --config=experiments/configs/<name>.py[:variants]`.

    python -m experiments.run --config=experiments/configs/sft.py:model=tiny --config.train.steps=10
    python -m experiments.run --config=experiments/configs/demo.py --workdir=runs/demo

A config with a `stages` list (pipeline.py, demo.py) runs its stages in order, each starting from the
previous stage's checkpoint; otherwise the config is one stage. Running the same command again resumes
every stage from its last checkpoint (finished stages are skipped).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import time

from absl import app, flags, logging
from ml_collections import config_flags

from glmv_jax.config_schema import validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:variants]", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None,
                                "checkpoints, logs and plots (default: runs/<config>[-<variants>]-<date>)")


def default_workdir(config_path: str) -> str:
    """runs/<config>-<variants>-<date>: "demo.py:smoke" and "demo.py" never share a directory (variants
    sorted, so their order does not matter; characters other than [A-Za-z0-9._=-] become _)."""
    path, _, arg = config_path.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    variants = "_".join(sorted(item.strip() for item in arg.split(",") if item.strip()))
    if variants:
        name = f"{name}-{re.sub(r'[^A-Za-z0-9._=-]', '_', variants)}"
    return os.path.join("runs", f"{name}-{datetime.date.today():%Y%m%d}")


def run_stage(cfg, workdir: str) -> dict:
    """One stage in its own work directory (its config validated first)."""
    validate(cfg)
    from glmv_jax.train.experiment import setup
    exp = setup(cfg, workdir)
    if cfg.stage in ("pretrain", "long_context", "sft"):
        from glmv_jax.train.supervised import run_supervised
        return run_supervised(exp)
    if cfg.stage == "rl":
        from glmv_jax.rl.stage import run_rl
        return run_rl(exp)
    if cfg.stage == "eval":
        from glmv_jax.evaluation.evaluate import run_eval
        return run_eval(exp)
    raise ValueError(f"unknown stage {cfg.stage!r}")


def evaluate_stage(cfg, workdir: str, params) -> dict:
    """Held-out evaluation of a stage's final params (its `eval` block), cached in the stage directory."""
    from glmv_jax.evaluation.evaluate import evaluate
    from glmv_jax.train.experiment import setup
    path = os.path.join(workdir, "eval.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    result = evaluate(setup(cfg, workdir), params)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def timed_in(stage_dir: str, key: str, fn):
    """fn() with its wall seconds added to stage_dir/seconds.json[key]: a stage that a rerun skips or
    resumes keeps the time it took when it ran."""
    path = os.path.join(stage_dir, "seconds.json")
    recorded = json.load(open(path)) if os.path.exists(path) else {}
    start = time.perf_counter()
    out = fn()
    recorded[key] = recorded.get(key, 0.0) + time.perf_counter() - start
    os.makedirs(stage_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(recorded, f)
    return out, recorded[key]


def run_pipeline(cfg, workdir: str) -> list[dict]:
    for stage in cfg.stages:          # every stage's config is checked before the first one compiles
        validate(stage)
    summaries, previous, seconds = [], "", {}
    for i, stage in enumerate(cfg.stages):
        stage_dir = os.path.join(workdir, f"{i}_{stage.stage}")
        if previous and not stage.train.init_from:
            stage.train.init_from = previous
        summary, seconds[stage.stage] = timed_in(stage_dir, "stage", lambda: run_stage(stage, stage_dir))
        if stage.stage in cfg.get("eval_after", ()):
            summary["eval"], seconds[f"{stage.stage}_eval"] = timed_in(
                stage_dir, "eval", lambda: evaluate_stage(stage, stage_dir, summary["state"].params))
        summaries.append(summary)
        previous = stage_dir
    if cfg.get("report", True):
        from experiments.report import write_report
        write_report(summaries, workdir, seconds)
    return summaries


def enable_compilation_cache() -> None:
    """XLA executables cached on disk: identical steps of later stages and reruns skip compilation."""
    import jax
    path = os.environ.get("GLMV_JAX_XLA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "glmv_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)     # orbax logs every checkpoint step at INFO
    from glmv_jax.sharding.distributed import initialize_from_env
    initialize_from_env()                      # multi-host: before any device is touched
    enable_compilation_cache()
    cfg = _CONFIG.value
    workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=1))
    if "stages" in cfg:
        run_pipeline(cfg, workdir)
    else:
        summary = run_stage(cfg, workdir)
        print(json.dumps({k: v for k, v in summary.items() if k not in ("state", "history")}, default=str))


if __name__ == "__main__":
    app.run(main)
