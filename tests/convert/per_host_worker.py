"""One process of a per-host checkpoint load (test_per_host_load.py, benchmarks/per_host_load.py).

    python tests/convert/per_host_worker.py --ckpt DIR --out DIR [--mesh '{"fsdp": 8}'] [--rules default]
        [--dtype float32] [--check] [--save DIR]

Started with XLA_FLAGS=--xla_force_host_platform_device_count=N and JAX_PLATFORMS=cpu; with GLMV_COORDINATOR /
GLMV_NUM_PROCESSES / GLMV_PROCESS_ID it joins a multi-process job (sharding.distributed). It loads DIR onto
the global mesh's shardings (the model's logical axes and a rules table) and writes DIR_out/result_<process>.json:
bytes read, the bytes its distinct shard boxes hold on disk (the count it should read), its peak RSS before and
after the load, the bytes its devices hold, and the largest single read (one layer of a box). --check compares every
addressable shard with a whole host load (done after the measurement); --save writes the sharded params back
with save_pretrained (every process writes its own shards).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from glmv_jax.config import from_hf_config  # noqa: E402
from glmv_jax.convert.hf import _prepare, flatten, load_pretrained, save_pretrained  # noqa: E402
from glmv_jax.convert.placement import device_boxes  # noqa: E402
from glmv_jax.sharding.distributed import initialize_from_env  # noqa: E402


def peak_rss() -> int:
    """This process's peak resident set so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_shardings(config, mesh_shape: dict, rules: str):
    from glmv_jax.models.glmv import init_params, logical_axes
    from glmv_jax.sharding.mesh import make_mesh
    from glmv_jax.sharding.rules import get_rules, tree_shardings
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return tree_shardings(logical_axes(config), abstract, make_mesh(mesh_shape), get_rules(rules))


def expected_reads(ckpt: Path, shardings) -> tuple[int, int]:
    """(stored bytes of this process's distinct shard boxes, the largest single read: one layer of a stacked
    leaf's box or an unstacked box), from the headers and the shardings alone, at the stored itemsize."""
    _, plan, fills, source = _prepare(ckpt, None)
    flat, total, largest = flatten(shardings), 0, 0
    for path, spec in plan.specs.items():
        itemsizes = {source.found[entry.key][2].itemsize for entry, _, _ in fills[path]}
        assert len(itemsizes) == 1, (path, itemsizes)
        for box in device_boxes(flat[path], spec.shape):
            size = math.prod(b - a for a, b in box) * min(itemsizes)
            total += size
            per_layer = size // (box[0][1] - box[0][0]) if spec.stack else size
            largest = max(largest, per_layer)
    return total, largest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mesh", default='{"fsdp": -1}')
    ap.add_argument("--rules", default="default")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--save", default="")
    args = ap.parse_args()
    kind = initialize_from_env()
    ckpt, out = Path(args.ckpt), Path(args.out)
    config = from_hf_config(json.loads((ckpt / "config.json").read_text()))
    shardings = model_shardings(config, json.loads(args.mesh), args.rules)
    want, largest = expected_reads(ckpt, shardings)
    rss_before = peak_rss()
    stats: dict = {}
    _, params = load_pretrained(ckpt, dtype=args.dtype, shardings=shardings, stats=stats)
    jax.block_until_ready(params)
    rss_after = peak_rss()
    leaves = flatten(params)
    result = dict(kind=kind, process=jax.process_index(), processes=jax.process_count(),
                  local_devices=jax.local_device_count(), bytes_read=stats["bytes_read"], expected_bytes=want,
                  largest_read=largest, rss_before=rss_before, rss_after=rss_after,
                  device_bytes=sum(s.data.nbytes for leaf in leaves.values() for s in leaf.addressable_shards),
                  model_bytes=sum(leaf.nbytes for leaf in leaves.values()))
    if args.check:
        _, host = load_pretrained(ckpt, dtype=args.dtype)
        ref = flatten(host)
        result["mismatches"] = [f"{p} {s.index}" for p, leaf in leaves.items() for s in leaf.addressable_shards
                                if not np.array_equal(np.asarray(s.data), ref[p][s.index])]
        wanted = flatten(shardings)
        result["shardings_match"] = all(leaf.sharding == wanted[p] for p, leaf in leaves.items())
    if args.save:
        save_pretrained(config, params, args.save, max_shard_size="30KB")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"result_{jax.process_index()}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
