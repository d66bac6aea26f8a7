"""Random-access record sources for grain: JSONL manifests, ArrayRecord files, in-memory lists.

Every source yields *raw* elements, `{"raw": str | bytes | dict, "where": str, "base_dir": str | None}`:
decoding (UTF-8, JSON) and validation happen later in `records.parse_record`, inside the grain map, so that
a bad line (invalid UTF-8 included) is skipped-and-counted (or raised) like any other bad record. `where` names the record's
origin for error messages ("train.jsonl:17", "shard-0.array_record[3]", "memory[5]"); `base_dir`
is the directory that relative image paths are resolved against (the manifest's directory).

A source is a grain `RandomAccessDataSource` (len + getitem); `open_sources` concatenates several into
one `grain.MapDataset`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import grain
from array_record.python import array_record_module


class JsonlSource:
    """One JSONL manifest: one record per non-empty line. Line byte offsets are indexed once at start."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"JSONL manifest not found: {path}")
        self.base_dir = os.path.dirname(self.path)
        self._offsets: list[tuple[int, int]] = []          # (byte offset, 1-based line number)
        with open(self.path, "rb") as f:
            offset = 0
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    self._offsets.append((offset, line_no))
                offset += len(line)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> dict:
        offset, line_no = self._offsets[index]
        with open(self.path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        return {"raw": line,            # bytes: records.decode_raw decodes strictly (invalid_utf8)
                "where": f"{os.path.basename(self.path)}:{line_no}", "base_dir": self.base_dir}

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, n={len(self)})"


class ArrayRecordSource:
    """ArrayRecord files whose records are UTF-8 JSON (the same records as a JSONL line).
    Relative image paths resolve against the directory of the first file."""

    def __init__(self, paths: str | Sequence[str]):
        paths = [paths] if isinstance(paths, str) else list(paths)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"ArrayRecord file(s) not found: {missing}")
        self.paths = [os.path.abspath(p) for p in paths]
        self.base_dir = os.path.dirname(self.paths[0])
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return {"raw": self._source[index], "where": f"{os.path.basename(self.paths[0])}[{index}]",
                "base_dir": self.base_dir}


class MemorySource:
    """An in-memory list of record dicts (e.g. `synthetic.generate(...)`, images as PIL images)."""

    def __init__(self, records: Sequence[dict], base_dir: str | None = None, name: str = "memory"):
        self.records = records
        self.base_dir = base_dir
        self.name = name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return {"raw": self.records[index], "where": f"{self.name}[{index}]", "base_dir": self.base_dir}


def write_array_record(path: str, records: Sequence[dict]) -> None:
    """Write records (JSON-able dicts, images as paths) to one ArrayRecord file."""
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for rec in records:
        writer.write(json.dumps(rec).encode("utf-8"))
    writer.close()


def as_source(spec: Any):
    """A source from a spec: a `*.jsonl` path, a `*.array_record` path, a list of
    record dicts, or an object that already is a source (has __len__ and __getitem__)."""
    if isinstance(spec, str):
        if spec.endswith((".jsonl", ".json")):
            return JsonlSource(spec)
        if ".array_record" in spec:
            return ArrayRecordSource(spec)
        raise ValueError(f"unknown data source {spec!r}: expected a .jsonl or .array_record path")
    if isinstance(spec, (list, tuple)):
        return MemorySource(spec)
    if hasattr(spec, "__len__") and hasattr(spec, "__getitem__"):
        return spec
    raise ValueError(f"unknown data source {type(spec).__name__}: {spec!r}")


def manifest_list(value: Any) -> tuple[str, ...]:
    """data.manifests as a tuple of paths: a list / tuple of paths, a comma-separated string, or a mix
    (`--config.data.manifests=a.jsonl,b.jsonl` arrives as ("a.jsonl,b.jsonl",)). Blank items are dropped."""
    items = [value] if isinstance(value, str) else list(value or ())
    return tuple(part.strip() for item in items for part in str(item).split(",") if part.strip())


def open_sources(specs: Any) -> grain.MapDataset:
    """One MapDataset over every source in `specs` (a single spec or a list of specs), concatenated."""
    if not isinstance(specs, (list, tuple)) or (specs and isinstance(specs[0], dict)):
        specs = [specs]
    datasets = [grain.MapDataset.source(as_source(s)) for s in specs]
    if not datasets:
        raise ValueError("no data sources given")
    return datasets[0] if len(datasets) == 1 else grain.MapDataset.concatenate(datasets)
