"""HF safetensors checkpoints <-> the parameter tree (models/PARAM_TREE.md), streaming in both directions.

    config, params = load_pretrained("dir")             # config.json + model.safetensors or a sharded index
    config, params = load_pretrained("dir", dtype="bfloat16", shardings=tree)   # this host's shards only
    save_pretrained(config, params, "out_dir", source="dir")  # loads in transformers, tokenizer files too

Loading validates every key and shape from the file headers before reading data. With `shardings`, each
process reads only the boxes of each tensor that its devices hold and builds the leaves on them, stacked
leaves one layer at a time (placement.py, sources.py); without, every leaf is one host numpy array, filled
tensor by tensor. Block-wise FP8 weights (GLM-4.5V-FP8 / GLM-4.6V-FP8) are dequantised to the requested
dtype as they are read (fp8.py). MTP / next-n layers are skipped with one warning. Saving computes each
file's header from shapes alone, then every process writes the shards it owns into place (host numpy or
sharded jax.Arrays), then the tokenizer, chat template and processor configs (processor_files.py: copied
from an HF source directory, or written from our tokenizer) so AutoTokenizer / AutoProcessor load the
directory too. The key table lives in mapping.py, the box arithmetic in views.py.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from glmv_jax.config import ConfigError, ModelConfig, from_hf_config, to_hf_config
from glmv_jax.convert import fp8
from glmv_jax.convert.mapping import ConversionError, Entry, is_mtp_key, key_table, listing, lookup_table, param_specs
from glmv_jax.convert.placement import fill_leaves, fills_by_leaf, read_plan
from glmv_jax.convert.processor_files import save_processor_files
from glmv_jax.convert.sources import FileSource, MemorySource, open_safetensors
from glmv_jax.convert.views import Box, full_box, slices

__all__ = ["ConversionError", "hf_state_dict_to_params", "params_to_hf_state_dict", "load_pretrained", "load_plan",
           "save_pretrained"]

log = logging.getLogger(__name__)
_ST_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(ml_dtypes.bfloat16)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_READ_DTYPES = {**_ST_DTYPES, fp8.ST_NAME: fp8.FP8}       # fp8 is read (and dequantised), never written
INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"


def as_dtype(dtype) -> np.dtype | None:
    """np.dtype from a numpy/jax dtype or a name ('float32', 'bfloat16'); None stays None."""
    if dtype is None:
        return None
    return np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)


# ----------------------------------------------------------------------------------------------
# HF tensors -> parameter leaves

class _Plan:
    """Checks a checkpoint's keys and shapes against the config from (key -> shape, dtype) alone and decides
    each leaf's dtype; `fills` then says which HF boxes fill which leaf (placement.py)."""

    def __init__(self, config: ModelConfig, dtype=np.float32):
        self.config, self.dtype = config, as_dtype(dtype)
        self.specs = param_specs(config)
        self.table = lookup_table(config)
        self.leaf_dtypes: dict[str, np.dtype] = {p: np.dtype(np.float32) for p, s in self.specs.items() if s.fp32}
        self.skipped: list[str] = []

    def check(self, shapes: Mapping[str, tuple], dtypes: Mapping[str, np.dtype]) -> dict[str, list]:
        """Raises on a key set or shape that does not match; returns leaf path -> its fills (MTP layers skipped)."""
        covered = {p: np.zeros(s.stack, bool) for p, s in self.specs.items()}
        unexpected, wrong, dupes, entries = [], [], [], []
        for key, shape in shapes.items():
            entry = self.table.get(key)
            if entry is None:
                (self.skipped if is_mtp_key(key, self.config) else unexpected).append(key)
                continue
            if tuple(shape) != entry.shape:
                wrong.append(f"{key}: expected shape {entry.shape}, found {tuple(shape)}")
                continue
            for t in entry.targets:
                if np.any(covered[t.path][t.index]):
                    dupes.append(f"{key} (fills {t.path}{list(t.index)}, already filled by another key)")
                covered[t.path][t.index] = True
                self.leaf_dtypes.setdefault(t.path, self.dtype or np.dtype(dtypes[key]))
            entries.append(entry)
        missing = [e.key for e in key_table(self.config)
                   if not all(np.all(covered[t.path][t.index]) for t in e.targets)]
        problems = [(wrong, "tensors with the wrong shape"), (dupes, "duplicate tensors"),
                    (missing, "missing keys"), (unexpected, "unexpected keys")]
        message = [f"{len(items)} {what}: {listing(items)}" for items, what in problems if items]
        if message:
            raise ConversionError(f"checkpoint does not match the {self.config.model_type} config "
                                  f"(moe={self.config.text.moe}): " + " | ".join(message))
        if self.skipped:
            log.warning("skipped %d tensors of MTP/next-n layers (not part of the model): %s", len(self.skipped),
                        listing(self.skipped, 3))
        return fills_by_leaf(entries)


def unflatten(flat: Mapping[str, Any]) -> dict:
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for name, value in tree.items():
        path = f"{prefix}{name}"
        out.update(flatten(value, path + "/") if isinstance(value, Mapping) else {path: value})
    return out


def _to_numpy(x) -> np.ndarray:
    """numpy view of a numpy/jax array or a torch tensor (bf16 included)."""
    if hasattr(x, "detach"):
        import torch  # only for torch tensors handed in: torch is a test extra, not a dependency
        t = x.detach().cpu()
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
    return np.asarray(x)


def hf_state_dict_to_params(state_dict: Mapping[str, Any], config: ModelConfig, dtype=np.float32) -> dict:
    """In-memory HF state_dict (on-disk per-expert or in-memory fused experts) -> parameter tree.
    `dtype` None keeps each tensor's dtype; the router weight and correction bias are always fp32."""
    arrays = {k: _to_numpy(v) for k, v in state_dict.items()}
    plan = _Plan(config, dtype)
    fills = plan.check({k: a.shape for k, a in arrays.items()}, {k: a.dtype for k, a in arrays.items()})
    return unflatten(fill_leaves(plan.specs, fills, plan.leaf_dtypes, {}, MemorySource(arrays)))


# ----------------------------------------------------------------------------------------------
# Parameter leaves -> HF tensors

def _check_params(config: ModelConfig, params: Mapping[str, Any]) -> dict[str, Any]:
    specs, flat = param_specs(config), flatten(params)
    missing = [p for p in specs if p not in flat]
    unexpected = [p for p in flat if p not in specs]
    wrong = [f"{p}: expected shape {specs[p].shape}, found {tuple(np.shape(flat[p]))}"
             for p in specs if p in flat and tuple(np.shape(flat[p])) != specs[p].shape]
    problems = [(wrong, "leaves with the wrong shape"), (missing, "missing leaves"), (unexpected, "unexpected leaves")]
    message = [f"{len(items)} {what}: {listing(items)}" for items, what in problems if items]
    if message:
        raise ConversionError("parameter tree does not match the config: " + " | ".join(message))
    return flat


def _export(config: ModelConfig, params, expert_layout: str | None, dtype) -> list[tuple[Entry, np.dtype, Any]]:
    """(entry, output dtype, producer) per HF tensor in save order; a producer builds one tensor on demand."""
    flat, dtype, specs = _check_params(config, params), as_dtype(dtype), param_specs(config)
    out = []
    for entry in key_table(config, expert_layout):
        first = entry.targets[0].path
        out_dtype = np.dtype(np.float32) if specs[first].fp32 else (dtype or np.dtype(flat[first].dtype))

        def produce(entry=entry, out_dtype=out_dtype):
            parts = [np.asarray(flat[t.path][t.index]) for t in entry.targets]
            return np.ascontiguousarray(entry.to_hf(*parts), dtype=out_dtype)
        out.append((entry, out_dtype, produce))
    return out


def params_to_hf_state_dict(config: ModelConfig, params: Mapping[str, Any], dtype=None,
                            expert_layout: str | None = None) -> dict[str, np.ndarray]:
    """Parameter tree -> the on-disk HF state_dict (experts per-expert for glm4v_moe, fused for glm46v)."""
    return {entry.key: produce() for entry, _, produce in _export(config, params, expert_layout, dtype)}


# ----------------------------------------------------------------------------------------------
# load_pretrained

def _read_config(path: Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the raw config.json dict)."""
    file = path / "config.json"
    if not file.is_file():
        raise ConversionError(f"missing config.json in {path}")
    try:
        hf = json.loads(file.read_text())
        return from_hf_config(hf), hf
    except json.JSONDecodeError as e:
        raise ConversionError(f"{file} is not valid JSON: {e}") from e
    except ConfigError as e:
        raise ConversionError(f"{file}: {e}") from e


def _checkpoint_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"{index} is not a valid safetensors index ({e!r})") from e
        names = sorted(set(weight_map.values()))
        absent = [n for n in names if not (path / n).is_file()]
        if absent:
            raise ConversionError(f"{index} names shard files that do not exist in {path}: {absent}")
        return [path / n for n in names], weight_map
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE], None
    raise ConversionError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def _read_headers(files: list[Path], weight_map: dict[str, str] | None):
    """key -> (file, shape, dtype) from the shard headers, cross-checked against the index."""
    found: dict[str, tuple[Path, tuple, np.dtype]] = {}
    for file in files:
        with open_safetensors(file) as f:
            for key in f.keys():
                if key in found:
                    raise ConversionError(f"tensor {key} appears in both {found[key][0].name} and {file.name}")
                sl = f.get_slice(key)
                if sl.get_dtype() not in _READ_DTYPES:
                    raise ConversionError(f"{file}: tensor {key} has unsupported dtype {sl.get_dtype()}")
                found[key] = (file, tuple(sl.get_shape()), _READ_DTYPES[sl.get_dtype()])
    if weight_map is not None:
        lost = [f"{k} (in {v})" for k, v in weight_map.items() if k not in found or found[k][0].name != v]
        if lost:
            raise ConversionError(f"{INDEX_FILE} names tensors its shard files lack: {listing(lost)}")
    return found


def _prepare(path: Path, dtype) -> tuple[ModelConfig, _Plan, dict, FileSource]:
    """Headers only: (config, checked plan, leaf path -> fills, the source to read them from)."""
    config, hf = _read_config(path)
    files, weight_map = _checkpoint_files(path)
    found = _read_headers(files, weight_map)
    block = fp8.block_size(hf)
    quantised = fp8.plan_scales({k: v[1] for k, v in found.items()}, {k: v[2] for k, v in found.items()}, block)
    scale_keys = set(quantised.values())
    weights = {k: v for k, v in found.items() if k not in scale_keys}
    plan = _Plan(config, dtype)
    fills = plan.check({k: v[1] for k, v in weights.items()},
                       {k: np.dtype(np.float32) if v[2] == fp8.FP8 else v[2] for k, v in weights.items()})
    return config, plan, fills, FileSource(found, quantised, block)


def load_pretrained(path, dtype=np.float32, shardings: Any = None, stats: dict | None = None
                    ) -> tuple[ModelConfig, dict]:
    """Reads an HF checkpoint directory -> (ModelConfig, params).

    dtype: the parameter dtype (None keeps the checkpoint's; fp8 weights then dequantise to float32); router
    weight and correction bias stay fp32. Tensors are cast (fp8 dequantised, fp8.py) box by box as read.
    shardings: optional tree of jax shardings shaped like params (leaves may be missing). A leaf with a
    sharding is read only in the boxes this process's devices hold and built on them directly, a stacked
    leaf one layer at a time (placement.py); host memory stays about one layer (or one unstacked tensor)
    above what the devices hold. Leaves without one come back as host numpy arrays.
    stats: a dict that receives bytes_read, the stored bytes this process read."""
    config, plan, fills, source = _prepare(Path(path), dtype)
    with source:
        flat = fill_leaves(plan.specs, fills, plan.leaf_dtypes, flatten(shardings or {}), source)
    if stats is not None:
        stats["bytes_read"] = source.bytes_read
    return config, unflatten(flat)


def load_plan(path, shardings: Any, devices) -> int:
    """Stored bytes that load_pretrained(path, shardings=shardings) reads in a process holding `devices`,
    from the headers alone (the data may be absent, e.g. a sparse file with only the header written)."""
    config, plan, fills, source = _prepare(Path(path), None)
    return read_plan(plan.specs, fills, flatten(shardings or {}), source, devices)


# ----------------------------------------------------------------------------------------------
# save_pretrained

def parse_size(size) -> int:
    """'5GB' -> 5 * 10**9, '200MiB' -> 200 * 2**20, ints pass through (HF's convention)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ConversionError(f"cannot parse max_shard_size {size!r} (use an int or e.g. '5GB', '500MiB')")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(unit[0] if unit != "B" else " "))


def _header(items: list[tuple[Entry, np.dtype, Any]]) -> tuple[bytes, dict[str, int]]:
    """(the header bytes of one safetensors file, key -> file offset of its data), from shapes alone."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry, dt, _ in items:
        size = int(np.prod(entry.shape)) * dt.itemsize
        header[entry.key] = {"dtype": _ST_NAMES[dt], "shape": list(entry.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {k: start + v["data_offsets"][0] for k, v in header.items()
                                               if k != "__metadata__"}


def _owned_parts(leaf) -> Iterator[tuple[Box, Any]]:
    """(box of the leaf, its data) for the parts this process writes: a host array whole; of a jax.Array the
    addressable shards with replica_id 0, so every element is written by exactly one process."""
    if not isinstance(leaf, jax.Array):
        yield full_box(np.shape(leaf)), np.asarray(leaf)
        return
    for shard in leaf.addressable_shards:
        if shard.replica_id == 0:
            yield tuple(s.indices(n)[:2] for s, n in zip(shard.index, leaf.shape)), shard.data


def _write_owned(file: Path, items: list[tuple[Entry, np.dtype, Any]], offsets: Mapping[str, int],
                 flat: Mapping[str, Any]) -> None:
    """Writes into an existing, full-size safetensors file the bytes of every tensor part this process owns,
    each shard's boxes straight from its device (one piece in host memory at a time)."""
    for entry, dt, _ in items:
        out = np.memmap(file, dt, "r+", offsets[entry.key], entry.shape)
        for view, target in zip(entry.views, entry.targets):
            index = target.index
            for box, data in _owned_parts(flat[target.path]):
                if not all(a <= i < b for i, (a, b) in zip(index, box)):
                    continue
                part_box = box[len(index):]
                at = tuple(i - a for i, (a, _) in zip(index, box))
                for piece in view.pieces(part_box):
                    sub = tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(piece.part, part_box))
                    out[slices(piece.hf)] = view.write(piece, np.asarray(data[at + sub])).astype(dt, copy=False)
        out.flush()
        del out


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _shards(items: list, limit: int) -> Iterator[list]:
    shard, size = [], 0
    for item in items:
        nbytes = int(np.prod(item[0].shape)) * item[1].itemsize
        if shard and size + nbytes > limit:
            yield shard
            shard, size = [], 0
        shard.append(item)
        size += nbytes
    if shard:
        yield shard


def save_pretrained(config: ModelConfig, params: Mapping[str, Any], path, max_shard_size="5GB", dtype=None,
                    expert_layout: str | None = None, tokenizer=None, processor=None, source=None) -> list[Path]:
    """Writes config.json and model.safetensors (or model-0000i-of-0000n.safetensors + index) to `path`, and
    the tokenizer, chat template and processor configs (convert/processor_files.py): copied from the HF
    directory `source`, else written from `tokenizer` (and `processor`, a data.transforms.Processor).

    dtype: the stored dtype (None keeps each leaf's); the router weight and correction bias stay fp32.
    expert_layout: MoE expert keys, per_expert or fused; default is what from_pretrained reads for the
    model_type. Older model*.safetensors files and index in `path` are removed. Returns the weight files.

    params may hold sharded jax.Arrays, across processes too: process 0 writes the headers (files created at
    full size), then every process writes the shards it owns (replica 0) into place, so no host gathers the
    model or even a whole tensor. With several processes, `path` must be one filesystem all of them write
    (local disk, NFS, Lustre); every process calls save_pretrained."""
    path = Path(path)
    items = _export(config, params, expert_layout, dtype)
    if any(dt not in _ST_NAMES for _, dt, _ in items):
        raise ConversionError(f"cannot store dtypes {sorted({str(dt) for _, dt, _ in items} - set(map(str, _ST_NAMES)))}")
    shards = list(_shards(items, parse_size(max_shard_size)))
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    headers = [_header(shard) for shard in shards]
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        for old in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
            if old.name in (SINGLE_FILE, INDEX_FILE) or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", old.name):
                old.unlink(missing_ok=True)
        stored = [dt for entry, dt, _ in items if "mlp.gate." not in entry.key]
        hf = to_hf_config(config)
        hf["dtype"] = "bfloat16" if stored[0] == ml_dtypes.bfloat16 else str(stored[0])
        (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        for name, shard, (raw, _) in zip(names, shards, headers):
            with open(path / name, "wb") as f:
                f.write(raw)
                f.truncate(len(raw) + sum(int(np.prod(e.shape)) * dt.itemsize for e, dt, _ in shard))
    _sync("glmv save_pretrained: files created")
    flat = flatten(params)
    for name, shard, (_, offsets) in zip(names, shards, headers):
        _write_owned(path / name, shard, offsets, flat)
    _sync("glmv save_pretrained: tensors written")
    if jax.process_index() == 0:
        if len(shards) > 1:
            total = sum(int(np.prod(e.shape)) * dt.itemsize for e, dt, _ in items)
            weight_map = {entry.key: name for name, shard in zip(names, shards) for entry, _, _ in shard}
            (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                      indent=2) + "\n")
        save_processor_files(path, config, tokenizer, processor, source)
    return [path / n for n in names]
