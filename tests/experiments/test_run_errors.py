"""experiments.run's config errors: each names its key and is raised before anything is compiled (no XLA
backend compile between the call and the error); on the command line each is one line, exit status 2."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from experiments import run
from experiments.configs import demo, sft
from glmv_jax.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def compiles():
    """The XLA compiles that happen during the test (jax.monitoring events)."""
    seen = []
    listener = lambda name, *args, **kwargs: seen.append(name) if name == COMPILE_EVENT else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    yield seen
    jax.monitoring.unregister_event_duration_listener(listener)


def missing(tmp_path):
    return str(tmp_path / "missing")


CASES = {   # name -> (edit of sft.py:runlocal on the 8 simulated devices, the error's text)
    "dtype": (lambda c, tmp: c.model.update(dtype="float8"), r"model\.dtype = 'float8' is not one of"),
    "key typo": (lambda c, tmp: c.train.update(log_evry=3), r"unknown key train\.log_evry \(did you mean 'log_every'\?\)"),
    "batch vs mesh": (lambda c, tmp: c.data.update(batch_size=6),
                      r"data\.batch_size 6 \(6 rows per micro-batch\) is not divisible by the data-parallel mesh axes "
                      r"\{'fsdp': 8\}"),
    "patch budget": (lambda c, tmp: c.data.update(patch_budget=16),
                     r"data\.patch_budget 16 .* smaller than one data\.image_size=56 image: \d+ patch rows"),
    "hf_checkpoint": (lambda c, tmp: c.model.update(hf_checkpoint=missing(tmp)),
                      r"model\.hf_checkpoint: no such directory: .*missing"),
    "init_from": (lambda c, tmp: c.train.update(init_from=missing(tmp)), r"train\.init_from: no such directory: .*missing"),
    "init_from without checkpoints": (lambda c, tmp: c.train.update(init_from=str(tmp)),
                                      r"train\.init_from: no such directory: .*checkpoints"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_config_errors_name_their_key_before_any_compile(name, tmp_path, compiles):
    edit, message = CASES[name]
    cfg = sft.get_config("runlocal")
    edit(cfg, tmp_path)
    with pytest.raises(ConfigError, match=message):
        run.run_config(cfg, str(tmp_path / "run"))
    assert compiles == []


def test_a_pipeline_refuses_a_later_stage_before_the_first_compiles(tmp_path, compiles):
    cfg = demo.get_config("smoke")
    cfg.stages[1].data.patch_budget = 16
    with pytest.raises(ConfigError, match=r"data\.patch_budget 16"):
        run.run_config(cfg, str(tmp_path / "run"))
    assert compiles == [] and not (tmp_path / "run" / "0_pretrain" / "checkpoints").exists()


def cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_run_without_config_prints_usage_and_exits_2():
    out = cli()
    assert out.returncode == 2 and "usage: python -m experiments.run --config=" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args, message", [
    (["--config=experiments/configs/sft.py", "--config.train.log_evry=3"],
     "unknown key train.log_evry (did you mean 'log_every'?)"),
    (["--config=experiments/configs/sft.py:runlocal", "--config.model.dtype=float8"], "model.dtype = 'float8'"),
    (["--config=experiments/configs/demo.py:smokee"], "unknown demo.py variants ['smokee']"),
])
def test_a_config_error_on_the_command_line_is_one_line(args, message, tmp_path):
    out = cli(*args, f"--workdir={tmp_path}")
    assert out.returncode == 2 and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
