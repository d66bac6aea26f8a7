"""Global training batches from per-host packed batches (multi-host data parallelism).

Every host's pipeline packs its own BATCH.md batch: B_h rows and Np_h patch rows whose index keys are
host-local (`patch_segment` restarts at 1, `patch_frames` slots index the host's own patch rows, and the
k-th vision token of the host takes the host's k-th merged feature). The global batch the train step sees
joins the hosts' blocks: rows [P * B_h, ...], patch rows [P * Np_h, ...], patch_frames [P * F, L], host h's
block at position q_h (the block its devices hold; q_h = h on meshes whose leading axes split the hosts).
Joining needs the index keys made global first, by this host's patch block q:

    patch_segment  ids + q * Np_h  (0 stays padding: ids never collide, as a host has <= Np_h frames)
    patch_frames   slots + q * Np_h (-1 stays empty)
    vision_index   (added by `add_vision_index`) host-local feature row + q * Np_h / merge_area

so a host that does not fill its patch budget leaves padding rows in the middle of the global patch array
and the vision tokens still find their features (a global row-major cumsum would not).

    batch = global_batch(next(pipeline), mesh, rules, merge_area=4)   # dict of global jax.Arrays

On one process this is `add_vision_index` and a device_put with the train step's batch shardings.
Batches presplit into k micro-batches (leading [k] axis) join along each micro-batch's own axes.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from glmv_jax.batch import BATCH_WIDE_KEYS, PATCH_KEYS, ROW_AXIS
from glmv_jax.sharding import rules as rules_lib


def batch_shardings(batch: dict, mesh, rules: rules_lib.Rules = rules_lib.DEFAULT) -> dict:
    """NamedShardings for a BATCH.md batch: rows over the rules' act_batch axes (axis 1 of position_ids),
    packed patch rows over act_tokens; mesh axes that do not divide a dimension are dropped."""
    def names(key: str, ndim: int):
        if key in PATCH_KEYS:
            return ("act_tokens",) + (None,) * (ndim - 1)
        axis = ROW_AXIS.get(key, 0)
        return tuple("act_batch" if d == axis else None for d in range(ndim))
    return {key: NamedSharding(mesh, rules_lib.logical_to_spec(names(key, np.ndim(x)), np.shape(x), mesh, rules))
            for key, x in batch.items()}


def _lead(batch: Mapping[str, np.ndarray]) -> int:
    """1 for batches presplit into micro-batches (token_type [k, B, T]), else 0."""
    if "token_type" not in batch:
        raise ValueError(f"a BATCH.md batch needs 'token_type'; got keys {sorted(batch)}")
    ndim = np.ndim(batch["token_type"])
    if ndim not in (2, 3):
        raise ValueError(f"token_type must be [B, T] or presplit [k, B, T], got shape {np.shape(batch['token_type'])}")
    return ndim - 2


def block_axes(batch: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Per key, the axis along which the hosts' blocks join: rows for per-row keys, patch rows for the
    PATCH_KEYS, frame rows for patch_frames (after the leading [k] axis of presplit batches)."""
    lead = _lead(batch)
    rows = np.shape(batch["token_type"])[lead]
    axes = {}
    for key, value in batch.items():
        shape = np.shape(value)
        if lead and shape[:1] != np.shape(batch["token_type"])[:1]:
            raise ValueError(f"presplit batch[{key!r}] has shape {shape}; expected a leading axis of "
                             f"{np.shape(batch['token_type'])[0]} micro-batches like token_type")
        axis = lead + (0 if key in BATCH_WIDE_KEYS else ROW_AXIS.get(key, 0))
        if len(shape) <= axis:
            raise ValueError(f"batch[{key!r}] with shape {shape} has no axis {axis} to join hosts' blocks along")
        if key not in BATCH_WIDE_KEYS and shape[axis] != rows:
            raise ValueError(f"batch[{key!r}] with shape {shape} is not per-row: axis {axis} should hold the "
                             f"{rows} rows of token_type")
        axes[key] = axis
    return axes


def _check_patches(batch: Mapping[str, np.ndarray], lead: int, merge_area: int) -> int:
    """Np (per micro-batch) after checking the patch keys agree with each other and with the vision tokens."""
    has_patches = [key for key in PATCH_KEYS if key in batch]
    vision_tokens = (np.asarray(batch["token_type"]) > 0).sum(axis=(-2, -1))
    if not has_patches:
        if vision_tokens.any():
            raise ValueError(f"{int(vision_tokens.sum())} vision tokens (token_type > 0) but no patch rows "
                             f"({', '.join(PATCH_KEYS)})")
        return 0
    missing = sorted(set(PATCH_KEYS) - set(has_patches))
    if missing:
        raise ValueError(f"batch has {has_patches} but not {missing}: the patch keys come together")
    sizes = {key: np.shape(batch[key])[lead] for key in PATCH_KEYS}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"patch keys disagree on the number of patch rows: {sizes}")
    n = sizes["pixel_values"]
    if n % merge_area:
        raise ValueError(f"{n} patch rows per (micro-)batch is not a multiple of merge_area={merge_area}: hosts' "
                         f"patch blocks would split merge blocks (make data.patch_budget / processes a multiple)")
    real = (np.asarray(batch["patch_segment"]) != 0).sum(axis=-1)
    if (vision_tokens * merge_area != real).any():
        raise ValueError(f"vision tokens {np.ravel(vision_tokens).tolist()} x merge_area {merge_area} != real patch "
                         f"rows {np.ravel(real).tolist()} (patch_segment != 0): vision tokens and features disagree")
    return n


def add_vision_index(batch: Mapping[str, np.ndarray], merge_area: int = 4) -> dict[str, np.ndarray]:
    """The batch plus `vision_index` [B, T] (presplit: [k, B, T]) int32: the merged feature row each vision
    token takes (the k-th vision token of the (micro-)batch, row-major, takes row k), -1 on other tokens."""
    lead = _lead(batch)
    _check_patches(batch, lead, merge_area)
    token_type = np.asarray(batch["token_type"])
    flat = token_type.reshape(token_type.shape[:lead] + (-1,)) > 0
    index = np.where(flat, np.cumsum(flat, axis=-1) - 1, -1).astype(np.int32)
    return {**batch, "vision_index": index.reshape(token_type.shape)}


def offset_indices(batch: Mapping[str, np.ndarray], patch_block: int, merge_area: int = 4) -> dict[str, np.ndarray]:
    """Host-local index keys -> global ones for a host whose patch rows start at patch_block * Np (Np per
    micro-batch): patch_segment and patch_frames shifted by that many rows (0 / -1 kept), vision_index
    (added when absent) by that many merged features."""
    lead = _lead(batch)
    n = _check_patches(batch, lead, merge_area)
    out = dict(batch) if "vision_index" in batch else add_vision_index(batch, merge_area)
    shift = patch_block * n
    vision = np.asarray(batch["token_type"]) > 0
    out["vision_index"] = np.where(vision, np.asarray(out["vision_index"]) + shift // merge_area,
                                   out["vision_index"]).astype(np.int32)
    if n:
        segment = np.asarray(batch["patch_segment"])
        out["patch_segment"] = np.where(segment > 0, segment + shift, 0).astype(segment.dtype)
    if "patch_frames" in batch:
        frames = np.asarray(batch["patch_frames"])
        out["patch_frames"] = np.where(frames >= 0, frames + shift, -1).astype(frames.dtype)
    return out


def join_host_batches(batches: Sequence[Mapping[str, np.ndarray]], merge_area: int = 4) -> dict[str, np.ndarray]:
    """The global numpy batch that hosts 0..P-1 (in this order) make from their local batches: the layout
    `global_batch` builds on meshes whose host blocks follow the process order."""
    axes = block_axes(batches[0])
    parts = [offset_indices(b, h, merge_area) for h, b in enumerate(batches)]
    axes["vision_index"] = _lead(batches[0])
    return {key: np.concatenate([p[key] for p in parts], axis=axes[key]) for key in parts[0]}


def default_shardings(global_shapes: Mapping[str, Sequence[int]], mesh, rules: rules_lib.Rules = rules_lib.DEFAULT,
                      presplit: bool = False) -> dict[str, NamedSharding]:
    """batch_shardings for these global shapes; the leading [k] axis of presplit batches replicated."""
    shapes = {key: jax.ShapeDtypeStruct(tuple(s)[1:] if presplit else tuple(s), np.int32)
              for key, s in global_shapes.items()}
    out = batch_shardings(shapes, mesh, rules)
    return {key: NamedSharding(mesh, P(None, *s.spec)) for key, s in out.items()} if presplit else out


def _host_block(sharding, global_shape: tuple, axis: int, n_local: int) -> int | None:
    """Which block of n_local entries along `axis` this process's devices hold, or None when they hold
    anything else (e.g. the whole axis, replicated across processes)."""
    if n_local == 0:
        return 0
    boxes = list(sharding.addressable_devices_indices_map(global_shape).values())
    start = min(b[axis].start or 0 for b in boxes)
    stop = max(global_shape[axis] if b[axis].stop is None else b[axis].stop for b in boxes)
    if stop - start != n_local or start % n_local:
        return None
    return start // n_local


def _gather_blocks(value: np.ndarray, axis: int) -> np.ndarray:
    """Every host's block, joined along `axis` in process order (an all-gather across processes)."""
    stacked = np.asarray(multihost_utils.process_allgather(value, tiled=False))
    return np.concatenate(list(stacked), axis=axis)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh, rules: rules_lib.Rules = rules_lib.DEFAULT,
                 merge_area: int = 4, shardings: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
    """This host's BATCH.md batch (numpy, the same shapes on every host) -> the global batch as jax.Arrays
    laid out by `shardings` (default: the train step's batch shardings for the global shapes), with
    `vision_index` added and the index keys offset by this host's patch block (module docstring).

    Each key whose sharding gives every process one block of the joined axis goes through
    jax.make_array_from_process_local_data with the host's own block; a key laid out otherwise (e.g. rows
    replicated across processes) is all-gathered first (same values, more traffic)."""
    processes = jax.process_count()
    axes = block_axes(local_batch)
    lead = _lead(local_batch)
    axes["vision_index"] = lead
    local = {key: np.asarray(value) for key, value in local_batch.items()}
    global_shapes = {}
    for key, axis in axes.items():
        shape = list(np.shape(local[key] if key in local else local["token_type"]))
        shape[axis] *= processes
        global_shapes[key] = tuple(shape)
    if shardings is None:
        shardings = default_shardings(global_shapes, mesh, rules, presplit=bool(lead))
    missing = sorted(set(global_shapes) - set(shardings))
    if missing:
        raise ValueError(f"no sharding given for batch keys {missing}")
    # The patch block this host's patch rows land in decides every global index.
    blocks = {key: _host_block(shardings[key], global_shapes[key], axes[key], np.shape(local[key])[axes[key]])
              for key in PATCH_KEYS if key in local}
    if len(set(blocks.values())) > 1:
        raise ValueError(f"the patch keys' shardings put this host's patch rows in different blocks: {blocks}")
    patch_block = next(iter(blocks.values()), None)
    if patch_block is None:
        patch_block = jax.process_index()
    host = offset_indices(local, patch_block, merge_area)
    out = {}
    for key in sorted(global_shapes):    # the same order on every host: gathers are collectives
        sharding, shape, axis, value = shardings[key], global_shapes[key], axes[key], host[key]
        if processes > 1 and _host_block(sharding, shape, axis, value.shape[axis]) is None:
            value = _gather_blocks(value, axis)
        out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out
