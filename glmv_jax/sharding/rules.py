"""Logical axis rules: tables mapping the model's logical axis names to mesh axes, and the helpers that
turn a tree of logical names into shardings.

Parameters are tagged with logical names by the model (e.g. a q kernel is ("layers", "embed", "heads",
"head_dim")); activations by the `act_*` names through `constrain`. A rules table is a tuple of
(logical name, mesh axis | tuple of mesh axes | None); the first entry for a name wins. A mesh axis
that does not divide a dimension, or is already used by another dimension of the same array, is
dropped for that dimension (the dimension stays replicated) and counted by `replication_report`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = tuple[tuple[str, Any], ...]

_BATCH = ("data", "fsdp", "expert")
DEFAULT: Rules = (
    # activations
    ("act_batch", _BATCH), ("act_length", "sequence"), ("act_embed", None), ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"), ("act_mlp", "tensor"), ("act_vocab", "tensor"), ("act_exp", "expert"),
    ("act_tokens", _BATCH),
    # text decoder parameters
    ("vocab", "tensor"), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
    ("head_dim", None), ("layers", None), ("qkv", None),
    ("exp", "expert"), ("moe_mlp", "tensor"), ("moe_embed", "fsdp"),
    # vision tower parameters
    ("vit_embed", "fsdp"), ("vit_mlp", "tensor"), ("vit_heads", "tensor"), ("vit_patch", None),
    ("vit_pos", None),
)
# Every parameter sharded over all devices on its largest axis; no tensor parallelism.
PURE_FSDP: Rules = (
    ("act_batch", ("data", "fsdp", "tensor", "expert")), ("act_tokens", ("data", "fsdp", "tensor", "expert")),
    ("embed", ("fsdp", "tensor", "expert")), ("vit_embed", ("fsdp", "tensor", "expert")),
    ("moe_embed", ("fsdp", "tensor")), ("exp", "expert"),
) + tuple((name, None) for name in ("act_length", "act_embed", "act_heads", "act_kv_heads", "act_mlp",
                                     "act_vocab", "act_exp", "vocab", "mlp", "heads", "kv_heads", "head_dim",
                                     "layers", "qkv", "moe_mlp", "vit_mlp", "vit_heads", "vit_patch", "vit_pos"))
# Expert axis reused as data parallelism for the dense parts (dense models on an expert-shaped mesh).
EXPERT_AS_DATA: Rules = tuple((name, ("data", "fsdp", "expert") if name in ("act_batch", "act_tokens") else axes)
                              for name, axes in DEFAULT)

RULE_SETS = {"default": DEFAULT, "pure_fsdp": PURE_FSDP, "expert_as_data": EXPERT_AS_DATA}


def get_rules(name: str) -> Rules:
    if name not in RULE_SETS:
        raise ValueError(f"unknown logical axis rule set {name!r}; expected one of {sorted(RULE_SETS)}")
    return RULE_SETS[name]


def _lookup(rules: Rules, name: str | None):
    if name is None:
        return None
    for logical, axes in rules:
        if logical == name:
            return axes
    raise KeyError(f"logical axis {name!r} has no entry in the rules table")


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh, rules: Rules) -> P:
    """PartitionSpec for an array with these logical axis names; drops mesh axes that do not divide or repeat."""
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        axes = _lookup(rules, name)
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for axis in axes:
            size = mesh.shape[axis]
            if axis in used or size == 1:
                continue
            if shape is not None and shape[dim] % (math.prod(mesh.shape[a] for a in kept) * size):
                continue
            kept.append(axis)
        used.update(kept)
        spec.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*spec)


def tree_shardings(logical_tree: Any, shape_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a params-like tree, given the matching tree of logical name tuples."""
    is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)
    return jax.tree.map(lambda names, arr: NamedSharding(mesh, logical_to_spec(names, np.shape(arr), mesh, rules)),
                        logical_tree, shape_tree, is_leaf=is_names)


def replication_report(shardings: Any, shape_tree: Any) -> dict[str, float]:
    """Bytes of parameters fully replicated vs total, and bytes per device."""
    total = replicated = per_device = 0.0
    for sharding, arr in zip(jax.tree.leaves(shardings), jax.tree.leaves(shape_tree)):
        nbytes = math.prod(np.shape(arr)) * np.dtype(arr.dtype).itemsize
        shard = sharding.shard_shape(np.shape(arr))
        total += nbytes
        per_device += math.prod(shard) * np.dtype(arr.dtype).itemsize
        if tuple(shard) == tuple(np.shape(arr)) and sharding.mesh.size > 1:
            replicated += nbytes
    return {"total_bytes": total, "replicated_bytes": replicated, "per_device_bytes": per_device,
            "replicated_fraction": replicated / max(total, 1.0)}


def check_replication(shardings: Any, shape_tree: Any, max_fraction: float) -> dict[str, float]:
    """Raises when more than `max_fraction` of parameter bytes would be replicated on every device."""
    report = replication_report(shardings, shape_tree)
    if report["replicated_fraction"] > max_fraction:
        raise ValueError(f"{report['replicated_fraction']:.1%} of parameter bytes are replicated "
                         f"(limit {max_fraction:.1%}); adjust the rules table or the mesh")
    return report


# ----------------------------------------------------------------------------------------------
# Activation constraints: active only inside `activation_sharding(mesh, rules)` (at trace time).

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("glmv_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Rules = DEFAULT) -> Iterable[None]:
    token = _ACTIVE.set((mesh, rules) if mesh is not None and mesh.size > 1 else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_sharding() -> tuple[Mesh, Rules] | None:
    """(mesh, rules) of the innermost `activation_sharding` block, or None outside one (or on one device)."""
    return _ACTIVE.get()


def current_mesh() -> tuple[Mesh | jax.sharding.AbstractMesh | None, Rules]:
    """(mesh, rules) activations are laid out on now: `activation_sharding`'s, else the `jax.set_mesh` mesh with
    the DEFAULT rules, else (None, DEFAULT)."""
    active = _ACTIVE.get()
    if active is not None:
        return active
    abstract = jax.sharding.get_abstract_mesh()
    return (None if abstract.empty else abstract), DEFAULT


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside `activation_sharding` or on one device."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))
