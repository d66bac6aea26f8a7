"""Device meshes from config: axes (data, fsdp, tensor, expert, sequence), -1 auto-fill, ICI x DCN.

    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1, "sequence": 1})
    mesh = make_mesh(ici={"fsdp": 4, "tensor": 2}, dcn={"data": 2})   # multi-slice

Axes are Auto (GSPMD propagation) unless asked otherwise: with JAX's default Explicit axes a matmul
over a sharded contracting dim fails instead of inserting the collective (docs/layout.md, sharding/mesh.py).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor", "expert", "sequence")


class MeshError(ValueError):
    """A mesh shape that cannot be laid out on the available devices."""


def resolve_shape(shape: Mapping[str, int], num_devices: int, what: str = "mesh") -> dict[str, int]:
    """Fills at most one -1 entry so the product equals `num_devices`; unknown axes and bad products raise."""
    unknown = set(shape) - set(AXES)
    if unknown:
        raise MeshError(f"unknown {what} axes {sorted(unknown)}; expected a subset of {AXES}")
    sizes = {axis: int(shape.get(axis, 1)) for axis in AXES}
    auto = [axis for axis, size in sizes.items() if size == -1]
    if len(auto) > 1:
        raise MeshError(f"{what}: at most one axis may be -1, got {auto}")
    bad = [axis for axis, size in sizes.items() if size == 0 or size < -1]
    if bad:
        raise MeshError(f"{what}: axis sizes must be positive or -1, got {[(a, sizes[a]) for a in bad]}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if auto:
        if num_devices % fixed:
            raise MeshError(f"{what}: fixed axes {sizes} (product {fixed}) do not divide {num_devices} devices")
        sizes[auto[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(f"{what} shape {sizes} has {fixed} devices but {num_devices} are available")
    return sizes


def make_mesh(ici: Mapping[str, int] | None = None, dcn: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None, explicit: bool = False) -> Mesh:
    """Builds a mesh with every axis of AXES (size 1 where unused).

    ici: per-slice axis sizes (one -1 allowed); dcn: axis sizes across slices (one -1 allowed). Without dcn the
    devices are laid out by `jax.make_mesh` (topology aware on TPU); with dcn by hybrid ICI x DCN placement.
    """
    devices = list(devices if devices is not None else jax.devices())
    axis_types = (AxisType.Explicit if explicit else AxisType.Auto,) * len(AXES)
    if not dcn:
        sizes = resolve_shape(ici or {"fsdp": -1}, len(devices))
        shape = tuple(sizes[a] for a in AXES)
        if devices == list(jax.devices()):
            return jax.make_mesh(shape, AXES, axis_types=axis_types)
        return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=axis_types)
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    dcn_sizes = resolve_shape(dcn, num_slices, "dcn mesh")
    ici_sizes = resolve_shape(ici or {"fsdp": -1}, len(devices) // num_slices, "ici mesh")
    grid = mesh_utils.create_hybrid_device_mesh([ici_sizes[a] for a in AXES], [dcn_sizes[a] for a in AXES],
                                                devices=devices)
    return Mesh(grid, AXES, axis_types=axis_types)


def mesh_from_config(mesh_cfg: Mapping) -> Mesh:
    """`mesh_cfg` is the experiment config's `mesh` block: {"ici": {...}, "dcn": {...}, "devices": n} or a flat
    axis dict. `devices` (optional) uses only the first n devices (e.g. 1 for a tiny demo on a TPU host)."""
    count = mesh_cfg.get("devices")
    devices = jax.devices()[:int(count)] if count else None
    if count and len(devices) < int(count):
        raise MeshError(f"mesh.devices={count} but only {len(devices)} devices are available")
    if "ici" in mesh_cfg or "dcn" in mesh_cfg:
        return make_mesh(dict(mesh_cfg.get("ici") or {}), dict(mesh_cfg.get("dcn") or {}), devices=devices)
    return make_mesh({k: v for k, v in mesh_cfg.items() if k != "devices"}, devices=devices)
