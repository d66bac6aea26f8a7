"""Ahead-of-time compilation of a stage's train step for a target mesh, and its per-device memory.

Nothing is materialized: parameters, optimizer state and the batch are `jax.ShapeDtypeStruct`s carrying
their NamedShardings, and `jit(step).lower(state, batch).compile()` builds the program a real run would use.

    devices = target_devices("cpu:256")        # or a TPU topology through libtpu: "v5e:16x16", "v4:4x4x4"
    plan = make_plan(cfg, devices)             # cfg: a stage's ml_collections config (experiments/configs)
    compiled = compile_train_step(plan)
    report = memory_report(compiled, plan, hbm_bytes=16 * 2**30)

Targets:
* "cpu:N": N simulated CPU devices of this process (XLA_FLAGS=--xla_force_host_platform_device_count=N,
  JAX_PLATFORMS=cpu; `python -m experiments.aot` starts such a process itself). XLA:CPU's memory analysis is
  only a proxy for an accelerator's: other fusion, layouts, no bf16-native kernels, different scheduling.
* a TPU topology name ("v5e:4x4", "v5p:2x2x2", ...): compile-only TPU devices from libtpu
  (`jax.experimental.topologies.get_topology_desc`), no TPU needed; optional extra `libtpu`.

The model config is the preset's (its real vocabulary: a stage run without an HF checkpoint swaps in the
suite tokenizer's, irrelevant at scale) with the stage's runtime knobs (dtype, remat, scan, attention).
`data.batch_size` is taken as the global batch: B rows of `seq_len`, Np = `patch_budget` patch rows,
split into `train.grad_accum_steps` presplit micro-batches, plus the pipeline's `patch_frames` (BATCH.md).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils, topologies
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from glmv_jax.batch import batch_shapes
from glmv_jax.config import ModelConfig
from glmv_jax.data.pipeline import data_config, frame_shape
from glmv_jax.models.glmv import init_params, logical_axes
from glmv_jax.sharding import rules as rules_lib
from glmv_jax.sharding.global_batch import batch_shardings
from glmv_jax.sharding.mesh import AXES, MeshError, resolve_shape
from glmv_jax.train.experiment import Experiment, base_model_config, data_processor
from glmv_jax.train.optimizer import build_optimizer
from glmv_jax.train.state import abstract_train_state, state_shardings
from glmv_jax.train.step import make_train_step, presplit
from glmv_jax.train.supervised import make_bias_rule, stage_loss_fn


class TopologyError(ValueError):
    """A target topology that cannot be had here, or a mesh that does not fit it."""


# ----------------------------------------------------------------------------------------------
# Target devices and the mesh on them

def cpu_device_count(topology: str) -> int | None:
    """N for "cpu:N", None for other (TPU) topologies; a malformed cpu topology raises."""
    kind, _, count = topology.partition(":")
    if kind != "cpu":
        return None
    if not count.isdigit() or int(count) < 1:
        raise TopologyError(f"cpu topology must look like 'cpu:256', got {topology!r}")
    return int(count)


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def target_devices(topology: str) -> list:
    """The devices of `topology`: this process's simulated CPU devices, or compile-only TPU devices."""
    count = cpu_device_count(topology)
    if count is not None:
        devices = jax.devices("cpu")
        if len(devices) != count:
            raise TopologyError(
                f"topology {topology!r} needs {count} simulated CPU devices but this process has {len(devices)}; "
                f"start it with XLA_FLAGS=--xla_force_host_platform_device_count={count} JAX_PLATFORMS=cpu "
                f"(python -m experiments.aot does this by itself)")
        return devices
    if not libtpu_available():
        raise TopologyError(f"TPU topology {topology!r} needs libtpu for compile-only devices "
                            f"(pip install libtpu==0.0.42.1); or target 'cpu:N'")
    # Compile-only devices need no exclusive TPU access: do not fail on another process's libtpu lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as err:  # libtpu reports bad names as JaxRuntimeError INVALID_ARGUMENT
        raise TopologyError(f"libtpu cannot describe TPU topology {topology!r} (expected e.g. 'v5e:4x4', "
                            f"'v4:2x2x2'): {err}") from err


def mesh_for_devices(ici: dict, devices: Sequence, topology: str = "") -> Mesh:
    """A mesh over every AXES name with `ici` sizes (one -1 allowed) on exactly these devices (Auto axes).
    TPU devices are laid out by their physical coordinates (mesh_utils.create_device_mesh)."""
    where = f"topology {topology!r}" if topology else "the target devices"
    try:
        sizes = resolve_shape(dict(ici), len(devices))
    except MeshError as err:
        raise TopologyError(f"mesh {dict(ici)} does not fit {where} ({len(devices)} devices): {err}") from err
    shape = [sizes[a] for a in AXES]
    if devices[0].platform == "tpu":
        grid = mesh_utils.create_device_mesh(shape, list(devices), allow_split_physical_axes=True)
    else:
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


# ----------------------------------------------------------------------------------------------
# The plan: everything the step needs, abstract

@dataclasses.dataclass
class AotPlan:
    cfg: Any                    # the stage config
    model_config: ModelConfig
    mesh: Mesh
    rules: rules_lib.Rules
    optimizer: Any              # train.optimizer.Optimizer
    abstract_params: Any        # ShapeDtypeStruct tree (no shardings)
    param_shardings: Any
    abstract_state: Any         # TrainState of ShapeDtypeStructs with shardings
    abstract_batch: dict        # BATCH.md keys -> ShapeDtypeStruct with shardings


def model_config_from(cfg) -> ModelConfig:
    """The stage's preset (or HF config) with its runtime knobs and `model.vision` / `model.text` overrides."""
    return base_model_config(cfg).validate()


def frames_shape(data_cfg, model_config: ModelConfig, micro_batches: int = 1) -> tuple[int | None, int | None]:
    """(F, L) of the batches' `patch_frames` as the data pipeline makes them (data.pipeline.frame_shape, with
    the processor `train.experiment.setup` builds), or (None, None) when the config turns them off."""
    processor = data_processor(data_cfg, model_config)
    return frame_shape(data_config(data_cfg, micro_batches=micro_batches), processor)


def abstract_batch_shapes(data_cfg, model_config: ModelConfig, micro_batches: int = 1) -> dict:
    """ShapeDtypeStructs of a BATCH.md batch (no shardings); with k > 1 micro-batches a leading [k] axis."""
    k, rows, length, patches = micro_batches, data_cfg.batch_size, data_cfg.seq_len, data_cfg.patch_budget
    if rows % k or patches % k:
        raise ValueError(f"data.batch_size {rows} and patch_budget {patches} must be divisible by "
                         f"grad_accum_steps {k}")
    b, n = rows // k, patches // k
    shapes = batch_shapes(b, length, n, model_config.vision.patch_dim)
    frames, frame_len = frames_shape(data_cfg, model_config, k) if n else (None, None)
    if frames is not None:
        shapes["patch_frames"] = ((frames, frame_len), np.dtype(np.int32))
    lead = (k,) if k > 1 else ()
    return {key: jax.ShapeDtypeStruct(lead + shape, dtype) for key, (shape, dtype) in shapes.items()}


def abstract_batch_with_shardings(shapes: dict, mesh: Mesh, rules: rules_lib.Rules, micro_batches: int) -> dict:
    """Rows over act_batch, patch rows over act_tokens (global_batch.batch_shardings); the [k] axis replicated."""
    k = micro_batches
    per_micro = {key: jax.ShapeDtypeStruct(s.shape[1:] if k > 1 else s.shape, s.dtype) for key, s in shapes.items()}
    shardings = batch_shardings(per_micro, mesh, rules)
    if k > 1:
        shardings = {key: NamedSharding(mesh, P(None, *sh.spec)) for key, sh in shardings.items()}
    return {key: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings[key]) for key, s in shapes.items()}


def abstract_params_of(model_config: ModelConfig) -> Any:
    return jax.eval_shape(lambda: init_params(model_config, jax.random.key(0)))


def make_plan(cfg, devices: Sequence, topology: str = "") -> AotPlan:
    """Abstract state and batch of `cfg`'s train step on a mesh of `devices` (cfg.mesh.ici sizes)."""
    if dict(cfg.mesh.get("dcn", {}) or {}):
        raise TopologyError("AOT compile takes one slice (mesh.ici); fold the mesh.dcn axes into mesh.ici")
    model_config = model_config_from(cfg)
    mesh = mesh_for_devices(dict(cfg.mesh.ici), devices, topology)
    rules = rules_lib.get_rules(cfg.mesh.rules)
    optimizer = build_optimizer(cfg.optimizer)
    abstract_params = abstract_params_of(model_config)
    param_shardings = rules_lib.tree_shardings(logical_axes(model_config), abstract_params, mesh, rules)
    st_shardings = state_shardings(optimizer, abstract_params, param_shardings, mesh)
    abstract_state = abstract_train_state(optimizer, abstract_params, st_shardings, jax.random.PRNGKey(cfg.seed))
    k = cfg.train.grad_accum_steps
    batch = abstract_batch_with_shardings(abstract_batch_shapes(cfg.data, model_config, k), mesh, rules, k)
    return AotPlan(cfg, model_config, mesh, rules, optimizer, abstract_params, param_shardings, abstract_state,
                   batch)


def compile_train_step(plan: AotPlan, compiler_options: dict | None = None):
    """The stage's jitted train step (train.supervised's loss, bias rule and step), lowered and compiled."""
    cfg, k = plan.cfg, plan.cfg.train.grad_accum_steps
    exp = Experiment(cfg, "", plan.mesh, plan.rules, plan.model_config, tokenizer=None, processor=None)
    step = make_train_step(stage_loss_fn(exp),
                           plan.optimizer, grad_accum_steps=k, nonfinite=cfg.train.nonfinite,
                           split_fn=presplit if k > 1 else None, state_shardings=jax.tree.map(
                               lambda s: s.sharding, plan.abstract_state),
                           batch_shardings={key: s.sharding for key, s in plan.abstract_batch.items()},
                           rules=plan.rules, post_update=make_bias_rule(exp, cfg.train.moe_bias_rate),
                           compiler_options=compiler_options)
    return step.lower(plan.abstract_state, plan.abstract_batch).compile()


# ----------------------------------------------------------------------------------------------
# Memory

def per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
    """Bytes one device holds of a sharded tree (the largest device, were shards uneven)."""
    per_device: dict[Any, int] = {}
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        itemsize = np.dtype(leaf.dtype).itemsize
        shard = math.prod(sharding.shard_shape(tuple(leaf.shape))) * itemsize
        for device in sharding.device_set:
            per_device[device] = per_device.get(device, 0) + shard
    return max(per_device.values(), default=0)


def memory_report(compiled, plan: AotPlan, hbm_bytes: float | None = None) -> dict[str, Any]:
    """Per-device bytes from XLA's memory analysis (arguments, outputs, aliased, temps, total) and from the
    shardings (params, optimizer state); `fits` when a device's HBM size is given."""
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError("this backend gives no memory analysis for compiled programs")
    args, out = stats.argument_size_in_bytes, stats.output_size_in_bytes
    alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
    state = plan.abstract_state
    shard_of = lambda tree: jax.tree.map(lambda s: s.sharding, tree)
    total_params = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state.params))
    report = {
        "devices": plan.mesh.size, "platform": plan.mesh.devices.flat[0].platform,
        "mesh": {a: int(s) for a, s in plan.mesh.shape.items() if s > 1},
        "param_count": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        "param_bytes_total": total_params,
        "param_bytes_per_device": per_device_bytes(state.params, shard_of(state.params)),
        "opt_state_bytes_per_device": per_device_bytes(state.opt_state, shard_of(state.opt_state)),
        "batch_bytes_per_device": per_device_bytes(list(plan.abstract_batch.values()),
                                                   [s.sharding for s in plan.abstract_batch.values()]),
        "argument_bytes": args, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
        "generated_code_bytes": stats.generated_code_size_in_bytes,
        "total_bytes": args + out - alias + temp,
    }
    if hbm_bytes is not None:
        report["hbm_bytes"] = float(hbm_bytes)
        report["fits"] = report["total_bytes"] <= hbm_bytes
    return report


_ALL_GATHER = re.compile(r"= (\w+)\[([\d,]*)\][^ ]* all-gather\(")


def gathered_activations(hlo_text: str, abstract_params: Any, top: int = 8) -> list[dict[str, Any]]:
    """The largest all-gather results of a compiled program (`compiled.as_text()`) that are not parameters:
    [{"dtype", "shape", "bytes", "count"}], biggest first. FSDP gathers every weight by design; a gathered
    activation (rows of the batch on every device) is usually a sharding bug. A result counts as a parameter
    when its element count equals a parameter's or one layer's slice of a stacked parameter (reshaped or
    transposed kernels included)."""
    param_sizes = set()
    for leaf in jax.tree.leaves(abstract_params):
        param_sizes.add(math.prod(leaf.shape))
        if len(leaf.shape) > 1:
            param_sizes.add(math.prod(leaf.shape[1:]))
    found: dict[tuple[str, tuple[int, ...]], int] = {}
    for dtype, dims in _ALL_GATHER.findall(hlo_text):
        shape = tuple(int(d) for d in dims.split(",") if d)
        if math.prod(shape) not in param_sizes:
            found[(dtype, shape)] = found.get((dtype, shape), 0) + 1
    rows = [{"dtype": dtype, "shape": shape, "count": count,
             "bytes": math.prod(shape) * _HLO_ITEMSIZE.get(dtype, 4)}
            for (dtype, shape), count in found.items()]
    return sorted(rows, key=lambda r: -r["bytes"])[:top]


_HLO_ITEMSIZE = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                 "s8": 1, "u8": 1, "pred": 1}


def format_count(n: float) -> str:
    """A count in the largest unit (B, M, K) it is at least one of, two decimals: 9.41B, 1.23M, 950."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if round(abs(n) / scale, 2) >= 1:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def format_report(report: dict[str, Any]) -> str:
    def gib(b: float) -> str:
        return f"{b / 2**30:10.3f} GiB" if b >= 2**30 else f"{b / 2**20:10.3f} MiB"
    lines = [f"devices {report['devices']} ({report['platform']}), mesh {report['mesh']}, "
             f"{format_count(report['param_count'])} params ({gib(report['param_bytes_total']).strip()} total)",
             "per device:"]
    for key in ("param_bytes_per_device", "opt_state_bytes_per_device", "batch_bytes_per_device",
                "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "total_bytes"):
        lines.append(f"  {key:28s} {gib(report[key])}")
    if "fits" in report:
        verdict = "fits" if report["fits"] else "does NOT fit"
        lines.append(f"  {verdict} in {gib(report['hbm_bytes']).strip()} of device memory")
    if report["platform"] == "cpu":
        lines.append("  (XLA:CPU memory analysis: a proxy for an accelerator's, not its exact numbers)")
    return "\n".join(lines)
