"""The one entry point: `python -m experiments.run --config=experiments/configs/<name>.py[:variants]`.

    python -m experiments.run --config=experiments/configs/sft.py:model=tiny --config.train.steps=10
    python -m experiments.run --config=experiments/configs/demo.py --workdir=runs/demo

A config with a `stages` list (pipeline.py, demo.py) runs its stages in order, each starting from the
previous stage's checkpoint; otherwise the config is one stage. Running the same command again resumes
every stage from its last checkpoint (finished stages are skipped); a rerun whose config changes a key that
shapes the saved checkpoints (config_schema.RERUN_GUARDED) is refused, naming the keys.

Every stage's config is checked before anything compiles (check_stage); a config error, a bad flag or an
unreadable checkpoint is one line on stderr (exit status 2), no --config prints the usage.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from glmv_jax.config import ConfigError
from glmv_jax.config_schema import check_rerun, validate
from glmv_jax.train.checkpoint import CheckpointError
from glmv_jax.train.experiment import SUPERVISED_STAGES, has_checkpoint, preflight, read_stage_config, setup

USAGE = ("usage: python -m experiments.run --config=experiments/configs/<name>.py[:variants] "
         "[--config.<key>=<value> ...] [--workdir=DIR]")
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


def check_stage(cfg, workdir: str) -> None:
    """A stage's config errors, before anything compiles: its keys and values (config_schema.validate), what
    needs the devices or files (experiment.preflight), and, where `workdir` holds checkpoints, that the
    config matches the saved one on the keys that shape them (config_schema.check_rerun)."""
    validate(cfg)
    preflight(cfg)
    if has_checkpoint(workdir):
        check_rerun(read_stage_config(workdir), cfg, workdir)


def run_stage(cfg, workdir: str) -> dict:
    """One stage in its own work directory (its config checked first)."""
    check_stage(cfg, workdir)
    exp = setup(cfg, workdir)
    if cfg.stage in SUPERVISED_STAGES:
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


def stage_dir(workdir: str, i: int, stage) -> str:
    return os.path.join(workdir, f"{i}_{stage.stage}")


def run_pipeline(cfg, workdir: str) -> list[dict]:
    for i, stage in enumerate(cfg.stages):    # every stage's config is checked before the first one compiles
        check_stage(stage, stage_dir(workdir, i, stage))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=1))
    summaries, previous, seconds = [], "", {}
    for i, stage in enumerate(cfg.stages):
        folder = stage_dir(workdir, i, stage)
        if previous and not stage.train.init_from:
            stage.train.init_from = previous
        summary, seconds[stage.stage] = timed_in(folder, "stage", lambda: run_stage(stage, folder))
        if stage.stage in cfg.get("eval_after", ()):
            summary["eval"], seconds[f"{stage.stage}_eval"] = timed_in(
                folder, "eval", lambda: evaluate_stage(stage, folder, summary["state"].params))
        summaries.append(summary)
        previous = folder
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


def run_config(cfg, workdir: str) -> None:
    """A pipeline config (`stages`) or one stage, in `workdir`."""
    if "stages" in cfg:
        run_pipeline(cfg, workdir)
    else:
        summary = run_stage(cfg, workdir)
        print(json.dumps({k: v for k, v in summary.items() if k not in ("state", "history")}, default=str))


def fail(message: str, usage: bool = False) -> None:
    """One line on stderr (and the usage line); exit status 2."""
    print(f"experiments.run: {message}" + (f"\n{USAGE}" if usage else ""), file=sys.stderr)
    sys.exit(2)


def flag_error(error: BaseException, argv: list[str]) -> str:
    """One line for an error raised while parsing the flags: the config file's own error (a bad variant),
    or an unknown `--config.<key>` override with ml_collections' closest name."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback" in text:
        return lines[-1]
    typo = re.match(r"'(\w+)'\s*(?:Did you mean \"(\w+)\")?", " ".join(lines))
    overrides = [a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config.")]
    if typo:
        for path in (o.split(".") for o in overrides):
            if typo.group(1) in path:
                key = ".".join(path[:path.index(typo.group(1)) + 1])
                hint = f" (did you mean {typo.group(2)!r}?)" if typo.group(2) else ""
                return f"unknown key {key}{hint}"
    return " ".join(lines)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with every error on one line and exit status 2; --config is required."""
    try:
        rest = flags.FLAGS(argv)
    except Exception as e:       # flags.Error, and what a config file or a --config.<key> override raises
        fail(flag_error(e, argv))
    if _CONFIG.value is None:
        fail("--config is required", usage=True)
    return rest


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)     # orbax logs every checkpoint step at INFO
    from glmv_jax.sharding.distributed import initialize_from_env
    initialize_from_env()                      # multi-host: before any device is touched
    enable_compilation_cache()
    workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
    try:
        run_config(_CONFIG.value, workdir)
    except (ConfigError, CheckpointError) as e:
        fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
