"""Per-host checkpoint loading: peak RSS and bytes read per process, and the bytes-read plan of GLM-4.5V.

    python -m benchmarks.per_host_load [--layers 6] [--append]

1. A ~0.6 GB fp32 MoE checkpoint (random weights, 100 MB shard files) is loaded on a global fsdp 8 mesh by
   2 processes x 4 simulated CPU devices (tests/convert/per_host_worker.py), and by 1 process x 8 devices for
   comparison: per process the stored bytes read, the bytes its distinct shard boxes hold, peak RSS before
   and after the load, the bytes its devices hold (on CPU these are host memory too) and the largest
   single read (one layer of a box).
2. GLM-4.5V's real layout (bf16, router fp32, per-expert keys, ~5 GB files) is written header-only as
   sparse files and planned with load_plan on 16 simulated devices split into 2 "processes" of 8:
   the bytes each would read under several meshes, without any data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=16")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import append_results, machine_line, uptime  # noqa: E402
from glmv_jax.config import ModelConfig, TextConfig, VisionConfig, glm45v, to_hf_config  # noqa: E402
from glmv_jax.convert.hf import INDEX_FILE, _header, _shards, load_plan, save_pretrained, unflatten  # noqa: E402
from glmv_jax.convert.mapping import key_table, param_specs  # noqa: E402
from glmv_jax.models.glmv import init_params, logical_axes  # noqa: E402
from glmv_jax.sharding.mesh import make_mesh  # noqa: E402
from glmv_jax.sharding.rules import get_rules, tree_shardings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "convert" / "per_host_worker.py"
GB, MB = 1e9, 1e6


def medium_config(layers: int) -> ModelConfig:
    vision = VisionConfig(depth=2, hidden_size=256, num_heads=4, out_hidden_size=512, intermediate_size=1024)
    text = TextConfig(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, mrope_section=(4, 6, 6), moe=True,
                      moe_intermediate_size=512, n_routed_experts=32, num_experts_per_tok=4, first_k_dense_replace=1,
                      pad_token_id=0, eos_token_id=(1,))
    return ModelConfig(model_type="glm4v_moe", vision=vision, text=text, image_token_id=100, video_token_id=101,
                       image_start_token_id=102, image_end_token_id=103, video_start_token_id=104,
                       video_end_token_id=105).validate()


def run_workers(ckpt: Path, out: Path, processes: int, devices: int) -> list[dict]:
    port = 20000 + os.getpid() % 20000
    procs = []
    for i in range(processes):
        env = {k: v for k, v in os.environ.items() if not k.startswith("GLMV_")}
        env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                   PYTHONPATH=str(ROOT))
        if processes > 1:
            env.update(GLMV_COORDINATOR=f"127.0.0.1:{port}", GLMV_NUM_PROCESSES=str(processes), GLMV_PROCESS_ID=str(i))
        cmd = [sys.executable, str(WORKER), "--ckpt", str(ckpt), "--out", str(out), "--mesh", '{"fsdp": 8}']
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                      stderr=open(out.parent / f"{out.name}_{i}.err", "w")))
    for i, p in enumerate(procs):
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"worker {i} failed: see {out.parent / f'{out.name}_{i}.err'}")
    return [json.loads((out / f"result_{i}.json").read_text()) for i in range(processes)]


def measured_rows(layers: int, work: Path) -> tuple[list[str], float]:
    config = medium_config(layers)
    rng = np.random.default_rng(0)
    params = unflatten({p: rng.standard_normal(s.shape, np.float32) for p, s in param_specs(config).items()})
    save_pretrained(config, params, work / "ckpt", max_shard_size="100MB")
    del params
    on_disk = sum(f.stat().st_size for f in (work / "ckpt").glob("model-*.safetensors"))
    rows = []
    for processes, devices in ((1, 8), (2, 4)):
        start = time.monotonic()
        results = run_workers(work / "ckpt", work / f"out_{processes}", processes, devices)
        wall = time.monotonic() - start
        for r in results:
            rise = r["rss_after"] - r["rss_before"]
            rows.append(f"| {processes} x {devices} | {r['process']} | {r['bytes_read'] / MB:,.0f} | "
                        f"{r['expected_bytes'] / MB:,.0f} | {r['rss_before'] / MB:,.0f} | {r['rss_after'] / MB:,.0f} | "
                        f"{rise / MB:,.0f} | {r['device_bytes'] / MB:,.0f} | {r['largest_read'] / MB:,.1f} | "
                        f"{(rise - r['device_bytes']) / MB:+,.0f} | {wall:.0f} |")
    return rows, on_disk


def sparse_checkpoint(config: ModelConfig, path: Path) -> int:
    """config.json, index and ~5 GB safetensors files holding only their headers (sparse, no data)."""
    bf16, f32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)
    items = [(e, f32 if ".mlp.gate." in e.key else bf16, None) for e in key_table(config, "per_expert")]
    shards = list(_shards(items, 5 * 10 ** 9))
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    path.mkdir(parents=True, exist_ok=True)
    for name, shard in zip(names, shards):
        raw, _ = _header(shard)
        with open(path / name, "wb") as f:
            f.write(raw)
            f.truncate(len(raw) + sum(int(np.prod(e.shape)) * dt.itemsize for e, dt, _ in shard))
    weight_map = {e.key: n for n, shard in zip(names, shards) for e, _, _ in shard}
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf = to_hf_config(config)
    (path / "config.json").write_text(json.dumps(hf))
    return sum(int(np.prod(e.shape)) * dt.itemsize for e, dt, _ in items)


def plan_rows(work: Path) -> tuple[list[str], int]:
    config = glm45v()
    total = sparse_checkpoint(config, work / "glm45v")
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    rows, devices = [], jax.devices()
    for mesh_shape, rules in (({"fsdp": 16}, "default"), ({"fsdp": 4, "expert": 4}, "default"),
                              ({"data": 2, "fsdp": 8}, "default"), ({"fsdp": 16}, "pure_fsdp")):
        shardings = tree_shardings(logical_axes(config), abstract, make_mesh(mesh_shape, devices=devices),
                                   get_rules(rules))
        per = [load_plan(work / "glm45v", shardings, devices[p * 8:(p + 1) * 8]) for p in range(2)]
        name = " x ".join(f"{a} {n}" for a, n in mesh_shape.items()) + f" ({rules})"
        rows.append(f"| {name} | {per[0] / GB:,.1f} | {per[1] / GB:,.1f} | {per[0] / total:.1%} |")
    return rows, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        measured, on_disk = measured_rows(args.layers, work)
        planned, total = plan_rows(work)
    text = "\n".join([
        f"### Per-host checkpoint loading (issue 13 item 3), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        machine_line(), f"Load: `{uptime()}`", "",
        f"A {on_disk / MB:,.0f} MB fp32 MoE checkpoint ({args.layers} layers, 32 experts, 100 MB files) loaded onto "
        "fsdp 8 (DEFAULT rules); `python -m benchmarks.per_host_load`. RSS is ru_maxrss: before = after jax start "
        "and shardings, after = peak through the load. On CPU the devices are host memory, so the rise includes "
        "what the devices hold; `rise - devices` is the host overhead.", "",
        "| processes x devices | process | read MB | its boxes MB | RSS before MB | RSS peak MB | rise MB | "
        "devices hold MB | largest read MB | rise - devices MB | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *measured, "",
        f"GLM-4.5V header-only plan ({total / GB:,.1f} GB bf16 in ~5 GB sparse files, per-expert keys), 16 devices "
        "as 2 processes x 8: stored bytes each process reads (load_plan, no data).", "",
        "| mesh (rules) | process 0 GB | process 1 GB | process 0 share |", "|---|---|---|---|", *planned, ""])
    print(text)
    if args.append:
        append_results(text)


if __name__ == "__main__":
    main()
