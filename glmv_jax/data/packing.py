"""Pack per-sample examples into the fixed-shape training batch of BATCH.md.

A *sample* (made by `transforms.py`) is a dict of numpy arrays for one record alone:
  input_ids, targets, token_type [L] int32; loss_mask [L] float32; position_ids [3, L] int32 (get_rope_index
  of the sample alone); pixel_values [N, Pd] float32 (its patch rows in token-appearance order);
  patch_pos, patch_grid [N, 2] int32; patch_frame [N] int32 (0-based image/frame index inside the sample);
  plus "id" (str).
`targets` are already shifted inside the sample (last = 0), so no target ever crosses a segment.

Packing is first-fit over the B rows of the batch being built: a sample goes into the first row with room
for its tokens, provided the batch's patch rows stay within Np. When it fits nowhere, the batch is emitted
and the sample opens the next one. Only that one sample is ever carried over, so the iterator state is just
the parent state from before that sample was read (plus counters): JSON-able and exact on restore.

With `frame_len` L (and `frames` F) the batch also carries `patch_frames` [F, L] (glmv_jax.batch.frame_slots):
the ViT's per-frame attention layout, fixed in shape. A sample is also refused when its frames would not fit
the F rows of L slots; a sample with a frame longer than L (or needing more than F rows alone) is a bad
record ("frame_too_long" / "too_many_frames").
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np

from glmv_jax.batch import PATCH_KEYS, batch_shapes, frame_lengths, frame_rows, frame_slots, pack_patches, patch_segments
from glmv_jax.data.records import BadRecord, BadRecordError

TOKEN_KEYS = ("input_ids", "targets", "loss_mask", "token_type")


def default_frames(patch_budget: int, frame_len: int, min_frame: int = 4) -> int:
    """F: rows of `frame_len` slots enough for any batch of <= patch_budget patch rows whose frames are at
    least `min_frame` long. Each row holds >= 1 frame (so <= Np // min_frame rows), and first-fit leaves at
    most one row half-empty or less (so <= ceil(2 Np / L) rows); all frames fit one row when L >= Np."""
    if min(patch_budget, frame_len, min_frame) <= 0:
        raise ValueError(f"patch_budget {patch_budget}, frame_len {frame_len}, min_frame {min_frame} must be positive")
    if frame_len >= patch_budget:
        return 1
    return max(1, min(patch_budget // min_frame, -(-2 * patch_budget // frame_len)))


def sample_fits(sample: dict, seq_len: int, patch_budget: int, frame_len: int | None = None,
                frames: int | None = None) -> BadRecord | None:
    """None if the sample can ever fit a row (and the [frames, frame_len] ViT layout), else the BadRecord
    saying why not."""
    n_tokens, n_patches = len(sample["input_ids"]), len(sample["pixel_values"])
    where = sample.get("where", sample.get("id", "?"))
    if n_tokens > seq_len:
        return BadRecord("too_long", where, f"{n_tokens} tokens exceed the packed length T={seq_len}")
    if n_patches > patch_budget:
        return BadRecord("too_many_patches", where, f"{n_patches} patch rows exceed the budget Np={patch_budget}")
    if frame_len is not None and n_patches:
        lengths = frame_lengths(patch_segments([sample]))
        if lengths.max() > frame_len:
            return BadRecord("frame_too_long", where, f"an image/frame of {int(lengths.max())} patches exceeds "
                             f"data.frame_len={frame_len}")
        if frames is not None and frame_rows(lengths, frame_len) > frames:
            return BadRecord("too_many_frames", where, f"{lengths.size} images/frames need "
                             f"{frame_rows(lengths, frame_len)} rows of {frame_len} slots; data.frames={frames}")
    return None


class BatchBuilder:
    """Collects samples into B rows of T tokens sharing Np patch rows; `build` makes the BATCH.md dict.

    frame_len: L of `patch_frames` [F, L] (None: no patch_frames); frames: F (None: default_frames(Np, L))."""

    def __init__(self, batch_size: int, seq_len: int, patch_budget: int, patch_dim: int,
                 frame_len: int | None = None, frames: int | None = None):
        self.batch_size, self.seq_len, self.patch_budget, self.patch_dim = batch_size, seq_len, patch_budget, patch_dim
        if frame_len is not None and frame_len <= 0 or frames is not None and (frame_len is None or frames <= 0):
            raise ValueError(f"frame_len must be positive (or None) and frames positive with a frame_len; got "
                             f"frame_len={frame_len}, frames={frames}")
        self.frame_len = frame_len
        self.frames = None if frame_len is None else frames or default_frames(patch_budget, frame_len)
        self.rows: list[list[dict]] = [[] for _ in range(batch_size)]
        self.row_tokens = [0] * batch_size
        self.n_patches = 0
        self.lengths: list[int] = []          # patch rows of every image / frame placed so far

    @property
    def empty(self) -> bool:
        return not any(self.rows)

    def add(self, sample: dict) -> bool:
        """Place `sample` in the first row with room; False if no row (or the patch budget) has room."""
        n_tokens, n_patches = len(sample["input_ids"]), len(sample["pixel_values"])
        if self.n_patches + n_patches > self.patch_budget:
            return False
        lengths = frame_lengths(patch_segments([sample])).tolist() if n_patches else []
        if self.frame_len is not None and lengths:
            if max(lengths) > self.frame_len:
                raise ValueError(f"sample {sample.get('id', '?')!r} has an image/frame of {max(lengths)} patches, "
                                 f"longer than frame_len={self.frame_len} (filter with sample_fits first)")
            # Every row of frame_slots holds at least one frame: only more frames than rows can overflow.
            if len(self.lengths) + len(lengths) > self.frames and \
                    frame_rows(self.lengths + lengths, self.frame_len) > self.frames:
                return False
        for r in range(self.batch_size):
            if self.row_tokens[r] + n_tokens <= self.seq_len:
                self.rows[r].append(sample)
                self.row_tokens[r] += n_tokens
                self.n_patches += n_patches
                self.lengths += lengths
                return True
        return False

    def build(self) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """-> (batch per BATCH.md, {"samples", "tokens", "patches"} of this batch)."""
        B, T, Np = self.batch_size, self.seq_len, self.patch_budget
        batch = {key: np.zeros(shape, dtype) for key, (shape, dtype) in batch_shapes(B, T, Np, self.patch_dim).items()
                 if key not in PATCH_KEYS}
        for r, row in enumerate(self.rows):
            t = 0
            for seg, s in enumerate(row, start=1):
                n = len(s["input_ids"])
                for key in TOKEN_KEYS:
                    batch[key][r, t:t + n] = s[key]
                batch["segment_ids"][r, t:t + n] = seg
                batch["position_ids"][:, r, t:t + n] = s["position_ids"]
                t += n
        samples = [s for row in self.rows for s in row]     # row-major: rows, then positions = token order
        batch.update(pack_patches(samples, Np, self.patch_dim))
        if self.frame_len is not None:
            batch["patch_frames"] = frame_slots(batch["patch_segment"], frames=self.frames, frame_len=self.frame_len)
        return batch, {"samples": len(samples), "tokens": sum(self.row_tokens), "patches": self.n_patches}


def check_batch(batch: dict[str, np.ndarray], merge_area: int = 4) -> None:
    """The BATCH.md invariants that can be checked on the batch alone; raises ValueError naming the broken one."""
    vision_tokens = int((batch["token_type"] != 0).sum())
    real_patches = int((batch["patch_segment"] != 0).sum())
    if vision_tokens * merge_area != real_patches:
        raise ValueError(f"{vision_tokens} vision tokens but {real_patches} patch rows (expected x{merge_area})")
    if real_patches and batch["patch_segment"][:real_patches].min() == 0:
        raise ValueError("padding patch rows interleaved with real ones")
    pad = batch["segment_ids"] == 0
    if (batch["loss_mask"][pad] != 0).any() or (batch["input_ids"][pad] != 0).any():
        raise ValueError("loss or tokens on padding positions")
    if (batch["loss_mask"][batch["token_type"] != 0] != 0).any():
        raise ValueError("loss on a vision token")


class PackIterDataset(grain.IterDataset):
    """grain IterDataset: samples (or BadRecord markers) in, fixed-shape packed batches out (with
    `patch_frames` [frames, frame_len] when frame_len is given; frames defaults to default_frames).

    on_bad_record="skip" counts each BadRecord / oversize sample by reason; "raise" raises BadRecordError
    naming the record. Even when skipping, `max_consecutive_bad` bad records in a row raise (an all-bad,
    repeating stream would otherwise spin forever). The iterator's `stats()` gives the counters and packing efficiencies.
    """

    def __init__(self, parent: grain.IterDataset, batch_size: int, seq_len: int, patch_budget: int,
                 patch_dim: int, on_bad_record: str = "skip", check: bool = True, merge_area: int = 4,
                 max_consecutive_bad: int = 1000, frame_len: int | None = None, frames: int | None = None):
        super().__init__(parent)
        if on_bad_record not in ("skip", "raise"):
            raise ValueError(f"on_bad_record must be 'skip' or 'raise', got {on_bad_record!r}")
        if frame_len is not None and frames is None:
            frames = default_frames(patch_budget, frame_len)
        self.kw = dict(batch_size=batch_size, seq_len=seq_len, patch_budget=patch_budget, patch_dim=patch_dim,
                       frame_len=frame_len, frames=frames)
        BatchBuilder(**self.kw)              # bad sizes fail here, not at the first batch
        self.on_bad_record, self.check, self.merge_area = on_bad_record, check, merge_area
        self.max_consecutive_bad = max_consecutive_bad

    def __iter__(self) -> "PackIterator":
        return PackIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"PackIterDataset({self.kw}, on_bad_record={self.on_bad_record})"


def _new_counters() -> dict[str, Any]:
    return {"batches": 0, "samples": 0, "tokens": 0, "patches": 0, "skipped": {}}


class PackIterator(grain.DatasetIterator):
    """State: {"parent": parent state before the carried-over sample (or current), "counters": {...}}."""

    def __init__(self, parent: grain.DatasetIterator, spec: PackIterDataset):
        super().__init__(parent)
        self.spec = spec
        self.counters = _new_counters()
        self.last: dict[str, float] = {}
        self._pending: dict | None = None            # the sample that did not fit the previous batch
        self._pending_state: Any = None              # parent state from before it was read
        self._exhausted = False
        self._bad_run = 0                            # consecutive bad records (an all-bad stream must not spin)

    def _next_sample(self) -> tuple[Any, dict | None]:
        """(parent state before the read, next good sample or None at the end); counts/raises bad ones."""
        while True:
            state = self._parent.get_state()
            try:
                element = next(self._parent)
            except StopIteration:
                return state, None
            kw = self.spec.kw
            bad = element if isinstance(element, BadRecord) else sample_fits(
                element, kw["seq_len"], kw["patch_budget"], kw["frame_len"], kw["frames"])
            if bad is None:
                self._bad_run = 0
                return state, element
            if self.spec.on_bad_record == "raise":
                raise bad.error()
            skipped = self.counters["skipped"]
            skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
            self._bad_run += 1
            if self._bad_run >= self.spec.max_consecutive_bad:
                raise BadRecordError(bad.reason, bad.where, f"{self._bad_run} bad records in a row (skipped so far: "
                                     f"{skipped}); is the data or T / Np misconfigured? Last: {bad.message}")

    def __next__(self) -> dict[str, np.ndarray]:
        builder = BatchBuilder(**self.spec.kw)
        if self._pending is not None:
            builder.add(self._pending)
            self._pending = self._pending_state = None
        while not self._exhausted:
            state, sample = self._next_sample()
            if sample is None:
                self._exhausted = True
            elif not builder.add(sample):
                self._pending, self._pending_state = sample, state
                break
        if builder.empty:
            raise StopIteration
        batch, info = builder.build()
        if self.spec.check:
            check_batch(batch, self.spec.merge_area)
        for key in ("samples", "tokens", "patches"):
            self.counters[key] += info[key]
        self.counters["batches"] += 1
        kw = self.spec.kw
        self.last = {"token_efficiency": info["tokens"] / (kw["batch_size"] * kw["seq_len"]),
                     "patch_efficiency": info["patches"] / kw["patch_budget"], "samples_per_batch": info["samples"]}
        return batch

    def stats(self) -> dict[str, Any]:
        """Counters since the start of the stream (restored with the state) and this batch's efficiencies."""
        c, kw = self.counters, self.spec.kw
        n = max(c["batches"], 1)
        return {**copy.deepcopy(c), **self.last,
                "mean_token_efficiency": c["tokens"] / (n * kw["batch_size"] * kw["seq_len"]),
                "mean_patch_efficiency": c["patches"] / (n * kw["patch_budget"]),
                "skipped_total": sum(c["skipped"].values())}

    def get_state(self) -> dict[str, Any]:
        parent = self._pending_state if self._pending is not None else self._parent.get_state()
        return {"parent": copy.deepcopy(parent), "counters": copy.deepcopy(self.counters),
                "exhausted": self._exhausted and self._pending is None}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self.counters = copy.deepcopy(state["counters"])
        self._pending = self._pending_state = None
        self._exhausted = bool(state.get("exhausted", False))
        self.last = {}
