"""Two processes x 4 simulated CPU devices load one sharded checkpoint onto a global fsdp 8 mesh
(per_host_worker.py): each addressable shard equals the whole single-host load, each process reads exactly the
stored bytes of its own distinct shard boxes (about half the model), and save_pretrained from the sharded state,
both processes writing their own shards, gives back the same tensors.

Every subprocess has a hard timeout; a failure shows the tail of each process's stderr.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from glmv_jax.convert.hf import load_pretrained, save_pretrained

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("per_host_worker.py")
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(ckpt: Path, out: Path, mesh: str, processes: int = 2, devices: int = 4, extra=()) -> list[dict]:
    """Runs the worker in `processes` joined processes; returns their result dicts (fails with their stderr)."""
    out.mkdir(parents=True, exist_ok=True)
    port, procs = free_port(), []
    for i in range(processes):
        env = {k: v for k, v in os.environ.items() if not k.startswith("GLMV_") and k != "XLA_FLAGS"}
        env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                   PYTHONPATH=str(ROOT))
        if processes > 1:
            env.update(GLMV_COORDINATOR=f"127.0.0.1:{port}", GLMV_NUM_PROCESSES=str(processes), GLMV_PROCESS_ID=str(i))
        log = out / f"stderr_{i}.txt"
        cmd = [sys.executable, str(WORKER), "--ckpt", str(ckpt), "--out", str(out), "--mesh", mesh, *extra]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w")), log))
    deadline, failed = time.monotonic() + TIMEOUT_S, None
    for proc, log in procs:
        try:
            if proc.wait(timeout=max(1.0, deadline - time.monotonic())) != 0 and failed is None:
                failed = f"{log.name} exited with {proc.returncode}"
        except subprocess.TimeoutExpired:
            failed = failed or f"timed out after {TIMEOUT_S} s"
            break
    if failed:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        pytest.fail(f"per-host load failed: {failed}\n" + "\n".join(
            f"----- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for _, log in procs))
    return [json.loads((out / f"result_{i}.json").read_text()) for i in range(processes)]


@pytest.fixture(scope="module")
def two_process_run(hf_checkpoint, tmp_path_factory):
    config, _, path = hf_checkpoint("glm4v_moe")
    base = tmp_path_factory.mktemp("per_host")
    _, params = load_pretrained(path)
    save_pretrained(config, params, base / "ckpt", max_shard_size="30KB")     # several shard files
    results = run_processes(base / "ckpt", base / "out", '{"fsdp": 8}',
                            extra=("--check", "--save", str(base / "saved")))
    return base, results


def test_each_process_gets_its_shards_of_the_single_host_load(two_process_run):
    _, results = two_process_run
    for i, r in enumerate(results):
        assert (r["kind"], r["process"], r["processes"], r["local_devices"]) == ("explicit", i, 2, 4)
        assert r["mismatches"] == [] and r["shardings_match"] is True


def test_each_process_reads_only_its_slices(two_process_run):
    base, results = two_process_run
    on_disk = sum(f.stat().st_size for f in (base / "ckpt").glob("model-*.safetensors"))
    for r in results:
        assert r["bytes_read"] == r["expected_bytes"]             # its distinct boxes, each exactly once
        assert r["bytes_read"] < 0.6 * on_disk                    # about half: fsdp splits it over the processes
    assert sum(r["bytes_read"] for r in results) < 1.2 * on_disk


def test_save_from_two_processes_gives_the_same_tensors(two_process_run):
    base, _ = two_process_run
    read = lambda d: {k: v for f in sorted(d.glob("model-*.safetensors")) for k, v in load_file(str(f)).items()}
    orig, saved = read(base / "ckpt"), read(base / "saved")
    assert sorted(saved) == sorted(orig) and len(list((base / "saved").glob("model-*.safetensors"))) > 2
    for key, a in orig.items():
        np.testing.assert_array_equal(saved[key], a, err_msg=key)
    assert json.loads((base / "saved" / "model.safetensors.index.json").read_text())["weight_map"]
