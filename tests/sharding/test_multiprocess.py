"""Two processes x 4 simulated CPU devices joined through jax.distributed (sharding.distributed's GLMV_* path,
gloo collectives) train the tiny model on one global data 2 x fsdp 4 mesh, each feeding its own packed host
batch (uneven patch fill: host 0 two images, host 1 one image and more text; host-local patch_segment,
patch_frames and vision tokens) through the supervised trainer's put path (parallel.global_batch); a third,
single process with 8 devices runs the same steps on the same 8 rows packed as one compact batch. Same
losses and params, only process 0 logs, and the Orbax checkpoint both processes wrote restores in this
(single) process.

Every subprocess has a hard timeout; a failure shows the tail of each process's stderr.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("multiprocess_worker.py")
STEPS = 2
TIMEOUT_S = 600        # all three processes together (3 steps took about 5 min at load 18)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, devices: int, extra_env: dict) -> tuple[subprocess.Popen, Path]:
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMV_") and k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT), **extra_env)
    name = f"stderr_{extra_env.get('GLMV_PROCESS_ID', 'single')}.txt"
    log = out / name
    proc = subprocess.Popen([sys.executable, str(WORKER), "--out", str(out), "--steps", str(STEPS)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    return proc, log


def tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no stderr file)"
    return text[-chars:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multiprocess")
    port = free_port()
    dist = {f"GLMV_COORDINATOR": f"127.0.0.1:{port}", "GLMV_NUM_PROCESSES": "2"}
    procs = [launch(base / "dist", 4, {**dist, "GLMV_PROCESS_ID": str(i)}) for i in range(2)]
    procs.append(launch(base / "single", 8, {}))
    deadline = time.monotonic() + TIMEOUT_S
    failed = None
    for proc, log in procs:
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if code != 0 and failed is None:
                failed = f"{log.name} exited with {code}"
        except subprocess.TimeoutExpired:
            failed = failed or f"timed out after {TIMEOUT_S} s"
            break
    if failed:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        report = "\n".join(f"----- {log.name} (last lines)\n{tail(log)}" for _, log in procs)
        pytest.fail(f"multi-process run failed: {failed}\n{report}")
    load = lambda d, p: json.loads((base / d / f"result_{p}.json").read_text())
    return {"dir": base, "p0": load("dist", 0), "p1": load("dist", 1), "single": load("single", 0)}


def test_two_processes_match_one_process(runs):
    from tests.sharding.multiprocess_worker import PATCHES, ROWS
    p0, p1, single = runs["p0"], runs["p1"], runs["single"]
    for r, pid, real in ((p0, 0, 48), (p1, 1, 16)):
        assert (r["kind"], r["process"], r["process_count"], r["local_devices"]) == ("explicit", pid, 2, 4)
        assert (r["local_rows"], r["local_patch_rows"], r["real_patch_rows"]) == (ROWS, PATCHES, real)
    assert (single["kind"], single["process_count"], single["local_devices"]) == ("single", 1, 8)
    assert (single["local_rows"], single["local_patch_rows"], single["real_patch_rows"]) == (2 * ROWS, 2 * PATCHES, 64)
    for r in (p0, p1, single):       # one global batch; the all-gather path lays it out the same
        assert (r["global_rows"], r["global_patch_rows"], r["gather_path_agrees"]) == (2 * ROWS, 2 * PATCHES, True)
    assert p0["losses"] == p1["losses"]                                  # replicated metrics, one job
    assert len(p0["losses"]) == STEPS and p0["losses"][-1] < p0["losses"][0]   # it trains
    np.testing.assert_allclose(p0["losses"], single["losses"], rtol=1e-5)
    np.testing.assert_allclose(p0["grad_norms"], single["grad_norms"], rtol=1e-4)
    dist = np.load(runs["dir"] / "dist" / "params.npz")
    ref = np.load(runs["dir"] / "single" / "params.npz")
    assert sorted(dist.files) == sorted(ref.files) and len(dist.files) > 20
    # Adam divides by sqrt(v), so an element with a near-zero gradient moves by up to lr (3e-3) per step on
    # summation-order noise alone: params agree to 5e-5 (1/60 of one step). The k bias has an exactly zero
    # gradient (softmax is shift invariant), so its whole update is such noise: not compared.
    for name in ref.files:
        if not name.endswith("attn/k/bias"):
            np.testing.assert_allclose(dist[name], ref[name], rtol=1e-4, atol=5e-5, err_msg=name)


def test_only_process_zero_writes_logs(runs):
    assert runs["p0"]["logged"] is True and runs["p1"]["logged"] is False
    lines = (runs["dir"] / "dist" / "logs" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(l) for l in lines]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))     # once per step, not once per host
    np.testing.assert_allclose([r["loss"] for r in records], runs["p0"]["losses"], rtol=1e-6)


def test_checkpoint_written_by_two_processes_restores_in_one(runs):
    """Both processes saved their shards (Orbax, async); this 8-device process restores onto fsdp 8."""
    from glmv_jax.config import tiny
    from glmv_jax.models.glmv import init_params, logical_axes
    from glmv_jax.sharding.mesh import make_mesh
    from glmv_jax.sharding.rules import DEFAULT, tree_shardings
    from glmv_jax.train.checkpoint import Checkpointer
    from glmv_jax.train.optimizer import build_optimizer
    from glmv_jax.train.state import abstract_train_state, state_shardings
    from tests.sharding.multiprocess_worker import OPTIMIZER

    config, mesh = tiny(), make_mesh({"fsdp": 8})
    optimizer = build_optimizer(OPTIMIZER)
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    shardings = state_shardings(optimizer, abstract, tree_shardings(logical_axes(config), abstract, mesh, DEFAULT),
                                mesh)
    with Checkpointer(runs["dir"] / "dist" / "ckpt", save_every=STEPS) as ckpt:
        assert ckpt.all_steps() == [STEPS]
        state, data_state = ckpt.restore_latest(abstract_train_state(optimizer, abstract, shardings))
    assert int(state.step) == STEPS and data_state is None
    saved = np.load(runs["dir"] / "dist" / "params.npz")
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert sorted(flat) == sorted(saved.files)
    for name, leaf in flat.items():
        assert leaf.sharding.mesh.shape["fsdp"] == 8
        np.testing.assert_array_equal(np.asarray(leaf), saved[name], err_msg=name)
