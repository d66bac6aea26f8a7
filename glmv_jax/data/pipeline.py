"""The grain data pipelines: packed training batches (BATCH.md) and RL / eval prompts.

    it = make_pipeline(cfg.data, tokenizer, Processor.for_model(model_config))
    batch = next(it); it.stats()                    # counters, skipped records by reason, packing efficiency
    state = it.get_state()                          # JSON-able; a fresh pipeline .set_state(state) resumes exactly

Graph: sources (JSONL / ArrayRecord / memory / synthetic) -> this host's shard (records index::count)
-> shuffle (per-epoch reseeded) -> repeat -> TrainingExampleTransform (parse, images, tokens, positions)
-> to_iter_dataset (thread prefetch) -> optional mp_prefetch (worker processes) -> PackIterDataset
-> (micro_batches > 1) StackIterDataset: [k, ...] micro-batches for gradient accumulation.
Batches carry `patch_frames` [F, L] (the ViT's per-frame attention layout; `frame_shape`) unless
data.frame_len = 0; each micro-batch's patch_frames index its own patch rows.
Every step before packing is a deterministic function of the record index, so the state is the element
index plus the packer's carry-over and counters.

Config keys (a ConfigDict, dict or DataConfig; unknown keys are ignored): see `DataConfig`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from glmv_jax.config import ConfigError, restore_tuples
from glmv_jax.data.image_files import MAX_IMAGE_PIXELS
from glmv_jax.data.packing import PackIterDataset, default_frames
from glmv_jax.data.records import BadRecord
from glmv_jax.data.sources import manifest_list, open_sources
from glmv_jax.data.synthetic import generate
from glmv_jax.data.transforms import Processor, PromptTransform, TrainingExampleTransform


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"          # synthetic | jsonl | array_record | memory (pass sources=)
    manifests: tuple | str = ()        # JSONL manifests / ArrayRecord files, or "a.jsonl,b.jsonl" (manifest_list)
    data_root: str | None = None       # image paths must resolve inside it (None: each manifest's folder)
    max_image_pixels: int = MAX_IMAGE_PIXELS   # larger images are bad records (image_too_large), never decoded
    domains: tuple = ("counting", "math", "ocr", "chart", "grounding", "gui", "choice")
    kind: str = "sft"                  # caption | sft | rl (synthetic records made; "rl" -> prompt pipeline)
    split: str = "train"
    num_records: int = 256             # synthetic records per domain
    image_size: int = 56               # synthetic image side
    tiers: Any = None                  # synthetic tier mix: None (all), a tier index, or {tier: weight}
    seq_len: int = 256                 # T
    batch_size: int = 8                # B: rows of the global batch (all hosts; each packs B / processes)
    patch_budget: int = 512            # Np: patch rows of the global batch (each host packs Np / processes)
    micro_batches: int = 1             # k > 1: [k, ...]-stacked micro-batches of B/k rows and Np/k patches each
    frame_len: int | None = None       # L of patch_frames [F, L] (ViT per-frame attention): None = the longest
                                       # image/frame the processor makes (synthetic: of an image_size image),
                                       # at most Np/k; 0 = no patch_frames (one segment-masked Np x Np block)
    frames: int | None = None          # F (per micro-batch): None = packing.default_frames(Np/k, L, shortest frame)
    loss_on: str = "auto"              # auto | all (see TrainingExampleTransform)
    on_bad_record: str = "skip"        # skip (counted) | raise
    max_consecutive_bad: int = 1000    # even when skipping: this many bad records in a row is an error
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None      # None: repeat forever
    shard_index: int | None = None     # None: this JAX process (grain ShardByJaxProcess)
    shard_count: int | None = None
    num_workers: int = 0               # > 0: grain mp_prefetch worker processes
    read_threads: int = 2              # grain ReadOptions thread prefetch
    prefetch: int = 16
    check: bool = True                 # check the BATCH.md invariants on every batch


def data_config(cfg: Any = None, **overrides) -> DataConfig:
    """DataConfig from a ConfigDict / dict / DataConfig (unknown keys ignored) plus overrides."""
    if cfg is None:
        values = {}
    elif isinstance(cfg, DataConfig):
        values = dataclasses.asdict(cfg)
    else:
        values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    known = {f.name for f in dataclasses.fields(DataConfig)}
    values = {k: v for k, v in {**values, **overrides}.items() if k in known}
    if "manifests" in values:
        values["manifests"] = manifest_list(values["manifests"])
    out = DataConfig(**restore_tuples(DataConfig, values))
    if out.on_bad_record not in ("skip", "raise"):
        raise ValueError(f"data.on_bad_record must be 'skip' or 'raise', got {out.on_bad_record!r}")
    if min(out.seq_len, out.batch_size, out.patch_budget) <= 0:
        raise ValueError(f"data.seq_len, batch_size, patch_budget must be positive, got {out.seq_len}, "
                         f"{out.batch_size}, {out.patch_budget}")
    if out.micro_batches < 1 or out.batch_size % out.micro_batches or out.patch_budget % out.micro_batches:
        raise ValueError(f"data.batch_size {out.batch_size} and patch_budget {out.patch_budget} must be divisible "
                         f"by micro_batches {out.micro_batches}")
    if out.frame_len is not None and out.frame_len < 0 or out.frames is not None and out.frames <= 0:
        raise ValueError(f"data.frame_len must be >= 0 (0: no patch_frames) or None, data.frames positive or None; "
                         f"got frame_len={out.frame_len}, frames={out.frames}")
    if (out.shard_index is None) != (out.shard_count is None):
        raise ValueError("give both data.shard_index and data.shard_count, or neither")
    if out.max_image_pixels <= 0:
        raise ValueError(f"data.max_image_pixels must be positive, got {out.max_image_pixels}")
    return out


def image_checks(cfg: Any) -> dict[str, Any]:
    """The transforms' file checks of a data config: {"data_root", "max_image_pixels"}."""
    cfg = cfg if isinstance(cfg, DataConfig) else data_config(cfg)
    return {"data_root": cfg.data_root, "max_image_pixels": cfg.max_image_pixels}


def per_process(cfg: DataConfig, processes: int) -> DataConfig:
    """This host's share of the global batch: batch_size / processes rows and patch_budget / processes patch
    rows (parallel.global_batch joins the hosts' batches into the global one)."""
    if cfg.batch_size % processes or cfg.patch_budget % processes:
        raise ValueError(f"data.batch_size {cfg.batch_size} and patch_budget {cfg.patch_budget} are the global "
                         f"batch and must be divisible by the {processes} processes")
    return data_config(cfg, batch_size=cfg.batch_size // processes, patch_budget=cfg.patch_budget // processes)


def shard_options(cfg: DataConfig) -> tuple[int, int]:
    """(shard_index, shard_count): from the config, else one shard per JAX process."""
    if cfg.shard_count is not None:
        if not 0 <= cfg.shard_index < cfg.shard_count:
            raise ValueError(f"shard_index {cfg.shard_index} outside 0..{cfg.shard_count - 1}")
        return cfg.shard_index, cfg.shard_count
    options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    return options.shard_index, options.shard_count


def synthetic_records(cfg: DataConfig) -> list[dict]:
    return [r for domain in cfg.domains
            for r in generate(domain, cfg.num_records, seed=cfg.seed, split=cfg.split, kind=cfg.kind,
                              image_size=cfg.image_size, tiers=_tiers(cfg.tiers))]


def _tiers(tiers):
    """ConfigDicts hold tier weights with string keys; the suite wants int tiers."""
    if hasattr(tiers, "items"):
        return {int(k): float(v) for k, v in tiers.items()}
    return tiers


def record_dataset(cfg: DataConfig, sources: Any = None) -> grain.MapDataset:
    """This host's shard of raw elements, shuffled and repeated as configured."""
    if sources is None:
        if cfg.source == "synthetic":
            sources = synthetic_records(cfg)
        elif cfg.source in ("jsonl", "array_record"):
            if not cfg.manifests:
                raise ValueError(f"data.source={cfg.source!r} needs data.manifests")
            sources = list(cfg.manifests)
        else:
            raise ValueError(f"data.source={cfg.source!r} needs sources= (or use synthetic / jsonl / array_record)")
    ds = open_sources(sources)
    index, count = shard_options(cfg)
    if count > 1:
        ds = ds[: len(ds) // count * count]            # equal shards: hosts stay in step
        ds = ds[index::count]
    if len(ds) == 0:
        raise ValueError(f"shard {index}/{count} of the data has no records")
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed + 7919 * index)
    return ds.repeat(cfg.num_epochs)


def frame_shape(cfg: DataConfig, processor: Processor, sources: Any = None) -> tuple[int | None, int | None]:
    """(F, L) of the batches' patch_frames for this config (per micro-batch), or (None, None) for none.

    L: data.frame_len, else the longest frame the processor makes (`frame_extent`; a frame the processor's
    min_pixels rounding makes longer is a bad record), never more than the micro-batch's Np. F: data.frames,
    else default_frames with the shortest frame."""
    if cfg.frame_len == 0:
        return None, None
    budget = cfg.patch_budget // cfg.micro_batches
    longest, shortest = frame_extent(cfg, processor, sources)
    frame_len = cfg.frame_len or min(longest, budget)
    return cfg.frames or default_frames(budget, frame_len, min(shortest, frame_len)), frame_len


def frame_extent(cfg: DataConfig, processor: Processor, sources: Any = None) -> tuple[int, int]:
    """(longest, shortest) patch rows of one image/frame the processor makes: for synthetic data those of an
    image_size x image_size image (every synthetic image), else max(min_pixels, max_pixels) over
    temporal_patch_size * patch_size^2, and one merge block."""
    image = processor.image
    if cfg.source == "synthetic" and sources is None:
        h, w = image.target_size(cfg.image_size, cfg.image_size)
        longest = (h // image.patch_size) * (w // image.patch_size)
        return longest, longest
    patch_area = image.temporal_patch_size * image.patch_size ** 2
    shortest = image.merge_size ** 2
    return max(shortest, max(image.min_pixels, image.max_pixels) // patch_area), shortest


def check_patch_budget(cfg: DataConfig, processor: Processor) -> None:
    """ConfigError when a synthetic image cannot fit one host's micro-batch patch budget (every record would
    be skipped as too_many_patches once training starts). Other sources are checked record by record when
    packing: their largest image is bounded only by the processor's max_pixels."""
    if cfg.kind == "rl" or cfg.source != "synthetic":
        return
    budget = cfg.patch_budget // jax.process_count() // cfg.micro_batches
    longest, _ = frame_extent(cfg, processor)
    if longest > budget:
        raise ConfigError(f"data.patch_budget {cfg.patch_budget} ({budget} patch rows per micro-batch and host) is "
                          f"smaller than one data.image_size={cfg.image_size} image: {longest} patch rows")


def _to_iter(ds: grain.MapDataset, cfg: DataConfig) -> grain.IterDataset:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch))
    if cfg.num_workers > 0:
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return it


def make_pipeline(data_cfg: Any, tokenizer, processor: Processor, sources: Any = None, **overrides):
    """Packed training batches (BATCH.md) -> a grain iterator with get_state / set_state / stats().
    Each of the jax.process_count() hosts packs its share of the global data.batch_size / patch_budget.

    sources: overrides the config's sources (a JSONL path, a list of records, a list of either).
    overrides: DataConfig fields, e.g. shard_index=0, shard_count=2, on_bad_record="raise".
    """
    cfg = per_process(data_config(data_cfg, **overrides), jax.process_count())
    if cfg.kind == "rl":
        raise ValueError("data.kind='rl' makes prompts, not training batches: use make_prompt_pipeline")
    ds = record_dataset(cfg, sources).map(TrainingExampleTransform(tokenizer, processor, cfg.loss_on,
                                                                   **image_checks(cfg)))
    k = cfg.micro_batches
    frames, frame_len = frame_shape(cfg, processor, sources)
    packed = PackIterDataset(_to_iter(ds, cfg), batch_size=cfg.batch_size // k, seq_len=cfg.seq_len,
                             patch_budget=cfg.patch_budget // k, patch_dim=processor.patch_dim,
                             on_bad_record=cfg.on_bad_record, check=cfg.check,
                             max_consecutive_bad=cfg.max_consecutive_bad,
                             merge_area=processor.merge_size ** 2, frame_len=frame_len, frames=frames)
    return iter(StackIterDataset(packed, k) if k > 1 else packed)


class _WrapIterDataset(grain.IterDataset):
    """An IterDataset whose iterator is `iterator_cls(parent's iterator, *args)`."""

    def __init__(self, parent: grain.IterDataset, iterator_cls, *args):
        super().__init__(parent)
        self._iterator_cls, self._args = iterator_cls, args

    def __iter__(self) -> grain.DatasetIterator:
        return self._iterator_cls(self._parent.__iter__(), *self._args)


class StackIterDataset(_WrapIterDataset):
    """k consecutive packed batches stacked on a new leading axis (train.step's presplit micro-batches: each
    holds its own patches, so the vision tower runs per micro-batch). The tail that does not fill k is dropped."""

    def __init__(self, parent: grain.IterDataset, k: int):
        super().__init__(parent, StackIterator, k)
        self.k = k


class StackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, k: int):
        super().__init__(parent)
        self.k = k

    def __next__(self) -> dict:
        parts = [next(self._parent) for _ in range(self.k)]
        return {key: np.stack([p[key] for p in parts]) for key in parts[0]}

    def stats(self) -> dict[str, Any]:
        return self._parent.stats()

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()     # always taken at a k boundary

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


# --------------------------------------------------------------------------- RL / eval prompts


class SkipBadIterDataset(_WrapIterDataset):
    """Drops BadRecord markers (counted by reason) or raises them, per on_bad_record."""

    def __init__(self, parent: grain.IterDataset, on_bad_record: str = "skip"):
        super().__init__(parent, SkipBadIterator, on_bad_record)
        self.on_bad_record = on_bad_record


class SkipBadIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, on_bad_record: str):
        super().__init__(parent)
        self.on_bad_record = on_bad_record
        self.skipped: dict[str, int] = {}
        self.yielded = 0

    def __next__(self):
        while True:
            element = next(self._parent)
            if not isinstance(element, BadRecord):
                self.yielded += 1
                return element
            if self.on_bad_record == "raise":
                raise element.error()
            self.skipped[element.reason] = self.skipped.get(element.reason, 0) + 1

    def stats(self) -> dict[str, Any]:
        return {"prompts": self.yielded, "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values())}

    def get_state(self) -> dict[str, Any]:
        return {"parent": copy.deepcopy(self._parent.get_state()), "skipped": dict(self.skipped),
                "yielded": self.yielded}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self.skipped, self.yielded = dict(state["skipped"]), int(state["yielded"])


def prompt_dataset(data_cfg: Any, tokenizer, processor: Processor, sources: Any = None, **overrides) -> grain.MapDataset:
    """Random access to prompts (one per record of this shard, not shuffled or repeated): element i is a
    prompt dict (transforms.PromptTransform) or a BadRecord. For curriculum samplers that pick by index."""
    cfg = data_config(data_cfg, **{"shuffle": False, "num_epochs": 1, **overrides})
    return record_dataset(cfg, sources).map(PromptTransform(tokenizer, processor, **image_checks(cfg)))


def make_prompt_pipeline(data_cfg: Any, tokenizer, processor: Processor, sources: Any = None, **overrides):
    """RL / eval prompts, one at a time (not packed): shuffled, repeated, sharded like make_pipeline;
    bad records skipped-and-counted or raised. -> iterator with get_state / set_state / stats()."""
    cfg = data_config(data_cfg, **overrides)
    ds = record_dataset(cfg, sources).map(PromptTransform(tokenizer, processor, **image_checks(cfg)))
    return iter(SkipBadIterDataset(_to_iter(ds, cfg), cfg.on_bad_record))
