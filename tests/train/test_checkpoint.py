"""Checkpoint/resume: bitwise-exact resume in process and after a SIGKILL mid-commit, partial directories ignored,
unreadable steps (a truncated file, a corrupt data iterator state) named, or set aside for the step before."""

import glob
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from glmv_jax.train.checkpoint import Checkpointer, CheckpointError
from glmv_jax.train.loop import restore_or_init, run_steps
from tests.train import toy
from tests.train.resume_script import build

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, SAVE_EVERY = 10, 2


def hex_losses(history):
    return [(h["step"], float(h["loss"]).hex()) for h in history]


def assert_bit_equal(a, b):
    as_bytes = lambda x: np.atleast_1d(np.asarray(x)).view(np.uint8)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(as_bytes(x), as_bytes(y)),
                 jax.device_get(a), jax.device_get(b))


@pytest.fixture(scope="module")
def parts():
    step_fn, abstract, init, _ = build(None, SAVE_EVERY)
    return step_fn, abstract, init


@pytest.fixture(scope="module")
def reference(parts):
    """Losses of an uninterrupted run of STEPS steps (no checkpointing)."""
    step_fn, _, init, = parts
    _, history = run_steps(init(), toy.data_iterator(seed=0), step_fn, num_steps=STEPS)
    return hex_losses(history)


def test_resume_in_process_is_bitwise_exact(tmp_path, parts, reference):
    step_fn, abstract, init = parts
    data = toy.data_iterator(seed=0)
    with Checkpointer(tmp_path / "ckpt", save_every=SAVE_EVERY) as ckpt:
        state = restore_or_init(ckpt, abstract, init, data)
        state, first = run_steps(state, data, step_fn, num_steps=4, checkpointer=ckpt)
        at_4, data_at_4 = jax.device_get(state), data.get_state()
        assert ckpt.all_steps() == [2, 4]
    data = toy.data_iterator(seed=0)
    with Checkpointer(tmp_path / "ckpt", save_every=SAVE_EVERY) as ckpt:
        state = restore_or_init(ckpt, abstract, init, data)
        assert_bit_equal(state, at_4)
        assert data.get_state() == data_at_4
        _, second = run_steps(state, data, step_fn, num_steps=8, checkpointer=ckpt)
        assert ckpt.latest_step() == 8
    assert hex_losses(first) + hex_losses(second) == reference[:8]


def test_killed_mid_commit_then_resumed_matches_uninterrupted_run(tmp_path, reference):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    cmd = [sys.executable, "-m", "tests.train.resume_script", "--workdir", str(tmp_path), "--steps", str(STEPS),
           "--save-every", str(SAVE_EVERY)]
    first = subprocess.run(cmd + ["--out", str(tmp_path / "run1.txt"), "--die-at-commit", "6"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == -9, first.stderr[-2000:]
    ckpt_dir = tmp_path / "ckpt"
    assert sorted(os.listdir(ckpt_dir)) == ["2", "4", "6.orbax-checkpoint-tmp"]   # step 6 written, not committed
    second = subprocess.run(cmd + ["--out", str(tmp_path / "run2.txt")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]

    def read(name):
        lines = (tmp_path / name).read_text().split("\n")
        assert lines[0].startswith("restored ")
        return int(lines[0].split()[1]), [(int(s), h) for s, h in (line.split() for line in lines[1:] if line)]

    start1, losses1 = read("run1.txt")
    start2, losses2 = read("run2.txt")
    assert start1 == 0 and start2 == 4 and len(losses1) >= 6
    assert losses1 == reference[:len(losses1)]
    assert losses2 == reference[4:]
    assert sorted(os.listdir(ckpt_dir)) == ["10", "8"]                          # keep=2, temporary dir gone


def test_partial_temporary_directory_is_ignored(tmp_path, parts):
    _, abstract, init = parts
    state = init()
    expected = jax.device_get(state)
    with Checkpointer(tmp_path / "ckpt", save_every=2) as ckpt:
        ckpt.save(state, {"next_index": 7}, step=2)
    # A save of step 4 that died half-way: a copy of step 2 under a temporary name with files cut short.
    partial = tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-1234"
    shutil.copytree(tmp_path / "ckpt" / "2", partial)
    for root, _, files in os.walk(partial):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(os.path.getsize(os.path.join(root, name)) // 2)
    with Checkpointer(tmp_path / "ckpt", save_every=2) as ckpt:
        assert ckpt.all_steps() == [2] and ckpt.latest_step() == 2
        restored, data_state = ckpt.restore_latest(abstract)
    assert data_state == {"next_index": 7}
    assert_bit_equal(restored, expected)
    assert not partial.exists()


def test_data_state_as_bytes_and_errors(tmp_path, parts):
    _, abstract, init = parts
    with Checkpointer(tmp_path / "ckpt", save_every=1, async_save=False) as ckpt:
        assert ckpt.restore_latest(abstract) is None
        with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
            ckpt.restore_params(abstract.params)
        ckpt.save(init(), b'{"next_index": 3}', step=1)
        assert ckpt.restore_latest(abstract)[1] == b'{"next_index": 3}'
        with pytest.raises(FileNotFoundError, match="step 5"):
            ckpt.restore(5, abstract)
        with pytest.raises(TypeError, match="JSON-able dict or bytes"):
            ckpt.save(init(), [1, 2], step=2)
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path / "other", save_every=0)


def saved_steps(directory, parts, steps=(2, 4)):
    """Checkpoints of the toy at `steps` (data state {"next_index": step})."""
    _, _, init = parts
    with Checkpointer(directory, save_every=1, async_save=False) as ckpt:
        for step in steps:
            ckpt.save(init(), {"next_index": step}, step=step)


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_truncated_file_names_step_and_file_or_falls_back_to_the_step_before(tmp_path, parts, caplog):
    _, abstract, _ = parts
    saved_steps(tmp_path / "ckpt", parts)
    step_dir = str(tmp_path / "ckpt" / "4")
    bad = max(glob.glob(f"{step_dir}/state/ocdbt.process_*/d/*"), key=os.path.getsize)   # the largest array file
    truncate(bad)
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        with pytest.raises(CheckpointError, match=rf"step 4 \({re.escape(step_dir)}\) is unreadable: {re.escape(bad)}: "):
            ckpt.restore_latest(abstract)
        assert ckpt.all_steps() == [2, 4]                       # fallback off: nothing moved
        with caplog.at_level(logging.WARNING):
            _, data_state = ckpt.restore_latest(abstract, fallback=True)
        assert data_state == {"next_index": 2}
        [line] = warnings_of(caplog)
        assert "\n" not in line and bad in line and "restored step 2 instead" in line
        assert ckpt.all_steps() == [2] and os.path.isfile(bad.replace(step_dir, step_dir + ".unreadable"))   # kept
        ckpt.save(parts[2](), {"next_index": 4}, step=4)      # the step number is free again
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4]


@pytest.mark.parametrize("stored", ['{"state": {"bogus": 1}}', '{"state": {"next_ind'])   # rejected; cut short
def test_a_corrupt_data_iterator_state_falls_back_with_its_step(tmp_path, parts, caplog, stored):
    step_fn, abstract, init = parts
    data = toy.data_iterator(seed=0)
    with Checkpointer(tmp_path / "ckpt", save_every=SAVE_EVERY) as ckpt:
        run_steps(init(), data, step_fn, num_steps=4, checkpointer=ckpt)
    bad = str(tmp_path / "ckpt" / "4" / "data" / "metadata")
    with open(bad, "w") as f:
        f.write(stored)
    with Checkpointer(tmp_path / "ckpt", save_every=SAVE_EVERY) as ckpt:
        with pytest.raises(CheckpointError, match=rf"step 4 .* is unreadable: {re.escape(bad)}: "):
            restore_or_init(ckpt, abstract, init, toy.data_iterator(seed=0))
        data = toy.data_iterator(seed=0)
        with caplog.at_level(logging.WARNING):
            state = restore_or_init(ckpt, abstract, init, data, fallback=True)
    assert int(state.step) == 2 and data.get_state() == {"next_index": 2}
    [line] = warnings_of(caplog)
    assert bad in line and "restored step 2 instead" in line


def test_every_step_unreadable_is_an_error_even_with_fallback(tmp_path, parts):
    _, abstract, _ = parts
    saved_steps(tmp_path / "ckpt", parts)
    for step in (2, 4):
        with open(tmp_path / "ckpt" / str(step) / "data" / "metadata", "w") as f:
            f.write("{")
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        with pytest.raises(CheckpointError, match="no restorable checkpoint .* step 4"):
            ckpt.restore_latest(abstract, fallback=True)
        assert ckpt.all_steps() == [2, 4]
