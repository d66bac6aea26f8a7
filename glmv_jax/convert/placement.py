"""Filling the parameter leaves from a source (sources.py), each host reading only the boxes its devices hold.

    leaves = fill_leaves(specs, fills, leaf_dtypes, shardings, source)   # path -> numpy or jax.Array
    per_process = read_plan(specs, fills, shardings, source, devices)    # bytes each device group would read

For a leaf with a sharding, the boxes of its addressable shards are found from the sharding
(devices holding the same box share one read). An unstacked leaf's box is read into one host buffer and
put on its devices. A stacked leaf (layers, experts first) is built on its devices layer by layer: one
zero buffer per device, then each layer's box is read into a host buffer of one layer and written into
the device buffers in place (a donated dynamic_update_slice), so the host never holds more than one
layer of it. Leaves without a sharding come back as whole host numpy arrays. Every process visits the
leaves in the same order and reads independently: no collectives.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glmv_jax.convert.mapping import Entry, LeafSpec, Target
from glmv_jax.convert.views import Box, View, box_shape, full_box

Fill = tuple[Entry, View, Target]


def fills_by_leaf(entries: Sequence[Entry]) -> dict[str, list[Fill]]:
    """leaf path -> the (entry, view, target) triples that fill it."""
    out: dict[str, list[Fill]] = {}
    for entry in entries:
        for view, target in zip(entry.views, entry.targets):
            out.setdefault(target.path, []).append((entry, view, target))
    return out


def device_boxes(sharding, shape: tuple[int, ...], devices: Sequence | None = None) -> dict[Box, list]:
    """Distinct shard boxes of `shape` under `sharding` on `devices` (default: the addressable ones) -> the
    devices holding each."""
    index_map = sharding.devices_indices_map(shape)
    wanted = set(devices) if devices is not None else sharding.addressable_devices
    devices = [d for d in index_map if d in wanted]
    out: dict[Box, list] = {}
    for d in devices:
        box = tuple(s.indices(n)[:2] for s, n in zip(index_map[d], shape))
        out.setdefault(box, []).append(d)
    return out


def _reads(fills: Sequence[Fill], box: Box, layer: int | None) -> Iterator[tuple[Entry, View, Any, tuple]]:
    """(entry, view, piece, host index) for every HF box that fills `box` of a leaf; with `layer`, only the
    fills of that layer, host index relative to box[1:] (a one-layer buffer)."""
    skip = 0 if layer is None else 1
    for entry, view, target in fills:
        index = target.index
        if layer is not None and index[0] != layer:
            continue
        if not all(a <= i < b for i, (a, b) in zip(index[skip:], box[skip:])):
            continue
        part_box = box[len(index):]
        at = tuple(i - a for i, (a, _) in zip(index[skip:], box[skip:]))
        for piece in view.pieces(part_box):
            sub = tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(piece.part, part_box))
            yield entry, view, piece, at + sub


def _fill_host(fills, box: Box, layer: int | None, dtype, source) -> np.ndarray:
    host = np.empty(box_shape(box if layer is None else box[1:]), dtype)
    for entry, view, piece, at in _reads(fills, box, layer):
        host[at] = view.read(piece, source.read(entry.key, piece.hf, dtype))
    return host


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(buffer: jax.Array, layer: jax.Array, i: jax.Array) -> jax.Array:
    """buffer [n, ...] with row i replaced by layer [...], in place (buffer donated)."""
    return jax.lax.dynamic_update_index_in_dim(buffer, layer, i, 0)


def _place(spec: LeafSpec, fills, sharding, dtype, source) -> jax.Array:
    arrays = {}
    for box, devices in device_boxes(sharding, spec.shape).items():
        if not spec.stack:
            host = _fill_host(fills, box, None, dtype, source)
            arrays.update({d: jax.device_put(host, d) for d in devices})
            continue
        buffers = {d: jnp.zeros(box_shape(box), dtype, device=d) for d in devices}
        for i, layer in enumerate(range(*box[0])):
            host = _fill_host(fills, box, layer, dtype, source)
            buffers = {d: _set_layer(b, jax.device_put(host, d), np.int32(i)) for d, b in buffers.items()}
        arrays.update(buffers)
    order = [d for d in sharding.addressable_devices_indices_map(spec.shape) if d in arrays]
    return jax.make_array_from_single_device_arrays(spec.shape, sharding, [arrays[d] for d in order])


def fill_leaves(specs: Mapping[str, LeafSpec], fills: Mapping[str, list[Fill]], dtypes: Mapping[str, np.dtype],
                shardings: Mapping[str, Any], source) -> dict[str, Any]:
    """path -> leaf: a jax.Array laid out by shardings[path], or host numpy where no sharding is given."""
    out = {}
    for path, spec in specs.items():
        sharding = shardings.get(path)
        if sharding is None:
            out[path] = _fill_host(fills[path], full_box(spec.shape), None, dtypes[path], source)
        else:
            out[path] = _place(spec, fills[path], sharding, dtypes[path], source)
    return out


def read_plan(specs: Mapping[str, LeafSpec], fills: Mapping[str, list[Fill]], shardings: Mapping[str, Any],
              source, devices: Sequence) -> int:
    """Stored bytes that a process holding `devices` reads in fill_leaves (headers only, no data)."""
    total = 0
    for path, spec in specs.items():
        sharding = shardings.get(path)
        boxes = [full_box(spec.shape)] if sharding is None else list(device_boxes(sharding, spec.shape, devices))
        for box in boxes:
            layers = range(*box[0]) if spec.stack and sharding is not None else [None]
            total += sum(source.nbytes(entry.key, piece.hf) for layer in layers
                         for entry, _, piece, _ in _reads(fills[path], box, layer))
    return total
