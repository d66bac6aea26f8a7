"""The batch contract of glmv_jax/data/BATCH.md, host side (numpy): which keys a batch holds, the sizes it is
padded to, how the patch rows of images / video frames are packed and laid out for the ViT, and the M-RoPE
positions of the tokens.

Every producer (data pipelines, generation prompts, rollouts, evaluation) and consumer (train step, global
batches, the model's forward) reads the layout from here. Shapes: N / Np patch rows, F frame rows of L slots.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from glmv_jax.config import ModelConfig

PATCH_KEYS = ("pixel_values", "patch_pos", "patch_grid", "patch_segment")   # [Np, ...] packed patch rows
BATCH_WIDE_KEYS = PATCH_KEYS + ("patch_frames",)   # belong to the whole batch, not to a row (axis 0: Np / F)
ROW_AXIS = {"position_ids": 1}   # batch entries whose row axis B is not axis 0 (position_ids is [3, B, T])
PROMPT_KEYS = ("input_ids", "token_type", "position_ids")   # what every prompt dict (PromptTransform) holds


# ----------------------------------------------------------------------------------------------
# Shapes, sizes and padding

def batch_shapes(rows: int, length: int, patches: int, patch_dim: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each key of the training batch (BATCH.md's table) for B = rows, T = length,
    Np = patches, Pd = patch_dim; `patch_frames` [F, L] int32 comes on top where the config has it."""
    b, t, n = rows, length, patches
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    return {"input_ids": ((b, t), i32), "targets": ((b, t), i32), "loss_mask": ((b, t), f32),
            "segment_ids": ((b, t), i32), "position_ids": ((3, b, t), i32), "token_type": ((b, t), i32),
            "pixel_values": ((n, patch_dim), f32), "patch_pos": ((n, 2), i32), "patch_grid": ((n, 2), i32),
            "patch_segment": ((n,), i32)}


def bucket(n: int, minimum: int, steps: int = 4) -> int:
    """Padded size for n: at least `minimum`, then `steps` steps per octave (at most 1/steps padding), so
    batches of similar size share one compiled function."""
    n = max(n, minimum)
    step = max(1, 2 ** (n.bit_length() - 1) // steps)
    return -(-n // step) * step


def pad_batch(batch: dict[str, np.ndarray], length: int, patches: int) -> dict[str, np.ndarray]:
    """Right-pads tokens to `length` (segment 0: never attended), patch rows to `patches` (segment 0, in
    no ViT frame: features never used) and patch_frames rows to a bucket (empty rows). Valid positions
    compute the same values."""
    out = dict(batch)
    extra = length - batch["input_ids"].shape[1]
    for key in ("input_ids", "segment_ids", "token_type", "position_ids"):
        widths = [(0, 0)] * (batch[key].ndim - 1) + [(0, extra)]
        out[key] = np.pad(batch[key], widths)
    if "pixel_values" in batch:
        rows = patches - batch["pixel_values"].shape[0]
        out["pixel_values"] = np.pad(batch["pixel_values"], [(0, rows), (0, 0)])
        out["patch_pos"] = np.pad(batch["patch_pos"], [(0, rows), (0, 0)])
        out["patch_grid"] = np.pad(batch["patch_grid"], [(0, rows), (0, 0)], constant_values=1)
        out["patch_segment"] = np.pad(batch["patch_segment"], [(0, rows)])
    if "patch_frames" in batch:
        frames = batch["patch_frames"].shape[0]
        out["patch_frames"] = np.pad(batch["patch_frames"], [(0, bucket(frames, 1) - frames), (0, 0)],
                                     constant_values=-1)
    return out


# ----------------------------------------------------------------------------------------------
# Patch rows

def patch_layout(frames: Sequence[Sequence[int]], merge: int = 2) -> dict[str, np.ndarray]:
    """For items with patch grids (t, h, w), in the order their pixel rows come: per patch row
    `patch_pos` [N, 2] (h_idx, w_idx in merge-block order), `patch_grid` [N, 2] (h, w) of its item and
    `patch_segment` [N] (1.. one per temporal slice: the ViT attention blocks)."""
    pos, grid, segment = [], [], []
    seg = 0
    for t, h, w in (tuple(int(g) for g in f) for f in frames):
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
        one = np.stack([block(hh), block(ww)], axis=-1)
        for _ in range(t):
            seg += 1
            pos.append(one)
            grid.append(np.broadcast_to([h, w], one.shape))
            segment.append(np.full(h * w, seg))
    if not pos:
        return dict(patch_pos=np.zeros((0, 2), np.int32), patch_grid=np.zeros((0, 2), np.int32),
                    patch_segment=np.zeros((0,), np.int32))
    return dict(patch_pos=np.concatenate(pos).astype(np.int32), patch_grid=np.concatenate(grid).astype(np.int32),
                patch_segment=np.concatenate(segment).astype(np.int32))


def _has_patches(item: dict) -> bool:
    return item.get("pixel_values") is not None and len(item["pixel_values"]) > 0


def patch_segments(items: Sequence[dict]) -> np.ndarray:
    """patch_segment [N] (unpadded) of the patch rows of `items` (samples or prompt dicts, each with
    patch_frame [n_i]: 0-based image / frame index inside the item) packed in order: frames numbered 1..
    across the items; items without patch rows skipped."""
    segments, frames = [np.zeros(0, np.int64)], 0
    for item in filter(_has_patches, items):
        frame = np.asarray(item["patch_frame"]).reshape(-1)
        segments.append(frame + frames + 1)
        frames += int(frame.max()) + 1
    return np.concatenate(segments)


def pack_patches(items: Sequence[dict], rows: int, patch_dim: int | None = None) -> dict[str, np.ndarray]:
    """The PATCH_KEYS arrays of the items' patch rows (pixel_values [n_i, Pd], patch_pos / patch_grid
    [n_i, 2], patch_frame [n_i]) concatenated in item order and padded to `rows`: pixel_values [rows, Pd]
    float32, patch_pos [rows, 2], patch_grid [rows, 2] ((1, 1) on padding), patch_segment [rows]
    (patch_segments; 0 on padding) int32. patch_dim: Pd when no item has patch rows."""
    vision = [item for item in items if _has_patches(item)]
    if patch_dim is None:
        if not vision:
            raise ValueError("pack_patches needs patch_dim when no item has patch rows")
        patch_dim = np.shape(vision[0]["pixel_values"])[1]
    segment = patch_segments(vision)
    n = len(segment)
    if n > rows:
        raise ValueError(f"{n} patch rows do not fit {rows}")
    shapes = batch_shapes(0, 0, rows, patch_dim)
    out = {key: np.zeros(*shapes[key]) for key in PATCH_KEYS}
    out["patch_grid"][:] = 1
    for key in ("pixel_values", "patch_pos", "patch_grid") if vision else ():
        out[key][:n] = np.concatenate([np.asarray(item[key]) for item in vision])
    out["patch_segment"][:n] = segment
    return out


# ----------------------------------------------------------------------------------------------
# ViT frame slots: patch_frames [F, L]

def frame_lengths(patch_segment) -> np.ndarray:
    """patch_segment [N] (frames 1..n, 0 on padding) -> [n] int64: the patch rows of each frame."""
    seg = np.asarray(patch_segment).reshape(-1).astype(np.int64)
    return np.bincount(seg[seg > 0])[1:]


def longest_frame(items: Sequence[dict]) -> int:
    """Patch rows of the largest image / video frame among the items (patch_segments; 0 without vision)."""
    return int(frame_lengths(patch_segments(items)).max(initial=0))


def _check_frame_len(longest: int, frame_len: int) -> None:
    if frame_len < longest:
        raise ValueError(f"a frame of {longest} patches does not fit patch_frames rows of {frame_len} slots")


def _first_fit(lengths: np.ndarray, frame_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Frames of `lengths` [n], longest first, each into the first row of frame_len slots with room ->
    (row [n], offset [n] of each frame's first slot, rows used)."""
    fill, row, offset = [], np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64)
    for f in np.argsort(-lengths, kind="stable"):
        r = next((i for i, used in enumerate(fill) if used + lengths[f] <= frame_len), len(fill))
        if r == len(fill):
            fill.append(0)
        row[f], offset[f] = r, fill[r]
        fill[r] += lengths[f]
    return row, offset, len(fill)


def frame_rows(lengths, frame_len: int) -> int:
    """Rows of `frame_len` slots that frame_slots packs frames of these lengths [n] into (0 for none)."""
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    _check_frame_len(int(lengths.max(initial=0)), frame_len)
    return _first_fit(lengths, frame_len)[2]


def frame_slots(patch_segment, frames: int | None = None, frame_len: int | None = None) -> np.ndarray:
    """patch_segment [N] (frames 1..n, each a contiguous run of rows; 0 on padding rows) -> patch_frames
    [F, L] int32: the ViT attention rows. Frames are packed first-fit (longest first) into rows of L slots
    holding patch row indices, -1 in empty slots; attention stays inside each frame (the segment mask), so
    small frames share a row instead of each padding one to L. L defaults to the longest frame and F to the
    rows used; pass them for a fixed shape (at least those sizes)."""
    seg = np.asarray(patch_segment).reshape(-1).astype(np.int64)
    rows = np.flatnonzero(seg > 0)
    real = seg[rows]
    n = int(real.max()) if rows.size else 0
    first, last = np.full(n + 1, seg.size), np.full(n + 1, -1)
    np.minimum.at(first, real, rows)
    np.maximum.at(last, real, rows)
    lengths = np.bincount(real, minlength=n + 1)[1:]
    if (lengths == 0).any() or (last[1:] - first[1:] + 1 != lengths).any():
        raise ValueError("patch_segment must number the frames 1..n, each a contiguous run of patch rows")
    longest = int(lengths.max()) if n else 1
    frame_len = longest if frame_len is None else frame_len
    _check_frame_len(longest, frame_len)
    row_of, offset_of, used = _first_fit(lengths, frame_len)
    frames = max(used, 1) if frames is None else frames
    if frames < used:
        raise ValueError(f"{n} frames need {used} rows of {frame_len} slots; patch_frames has {frames}")
    out = np.full((frames, frame_len), -1, np.int32)
    out[row_of[real - 1], offset_of[real - 1] + rows - first[real]] = rows
    return out


def patch_frames(patch_segment: np.ndarray, frame_len: int | None = None, frames: int | None = None) -> np.ndarray:
    """frame_slots [F, L] of a batch's patch rows with bucketed sizes, so similar batches share a compiled
    ViT: L = frame_len (default bucket(longest frame, 256), as models.glmv.prepare_inputs), F = frames
    (default the rows needed, bucketed)."""
    seg = np.asarray(patch_segment)
    lengths = frame_lengths(seg)
    if frame_len is None:
        frame_len = bucket(int(lengths.max()), 256) if lengths.size else 1
    if frames is None:
        frames = bucket(frame_rows(lengths, frame_len), 1)
    return frame_slots(seg, frames, frame_len)


# ----------------------------------------------------------------------------------------------
# Prompt dicts

def check_prompt(i: int, p: dict, merge_area: int) -> int:
    """Validates prompt dict `p` (number i, for messages); returns its number of vision tokens."""
    missing = [k for k in PROMPT_KEYS if k not in p]
    if missing:
        raise ValueError(f"prompt {i} lacks {missing}; prompts are transforms.PromptTransform dicts")
    ids = np.asarray(p["input_ids"])
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"prompt {i}: input_ids must be a non-empty [L] array, got shape {ids.shape}")
    if np.asarray(p["token_type"]).shape != ids.shape or np.asarray(p["position_ids"]).shape != (3, ids.size):
        raise ValueError(f"prompt {i}: token_type must be [L] and position_ids [3, L] for L={ids.size}")
    vision_tokens = int((np.asarray(p["token_type"]) > 0).sum())
    rows = 0 if p.get("pixel_values") is None else int(np.asarray(p["pixel_values"]).shape[0])
    if vision_tokens * merge_area != rows:
        raise ValueError(f"prompt {i}: {vision_tokens} vision tokens need {vision_tokens * merge_area} patch rows, "
                         f"got {rows}")
    return vision_tokens


def rope_delta(p: dict) -> int:
    """The prompt's rope delta: max position + 1 - length (recomputed when the dict lacks it). Token k >= L
    after the prompt has position k + rope_delta on all three M-RoPE streams."""
    if "rope_delta" in p:
        return int(p["rope_delta"])
    return int(np.asarray(p["position_ids"]).max(initial=-1)) + 1 - len(p["input_ids"])


# ----------------------------------------------------------------------------------------------
# M-RoPE positions: get_rope_index

def frame_grids(grid_thw) -> np.ndarray:
    """Each video (t, h, w) row becomes t rows of (1, h, w): one per temporal patch."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    hw = np.repeat(grid[:, 1:], grid[:, 0], axis=0)
    return np.concatenate([np.ones((len(hw), 1), np.int64), hw], axis=1)


def _vision_run_positions(start: int, grid, merge: int) -> tuple[np.ndarray, int]:
    """3D positions [3, t*gh*gw] of one image/frame starting at `start`, and the next text position."""
    t, h, w = (int(g) for g in grid)
    gh, gw = h // merge, w // merge
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
    pos = np.stack([tt, hh, ww]).reshape(3, -1) + start
    return pos, start + max(h, w) // merge


def get_rope_index(config: ModelConfig, input_ids, mm_token_type_ids, image_grid_thw=None,
                   video_grid_thw=None, attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """HF Glm4vModel.get_rope_index: (position_ids [3, B, T] int64, rope_deltas [B] int64).

    Per row (padding dropped), runs of equal token type: text runs count up on all 3 streams; an image
    run (type 1) takes the next image grid, a video run (type 2) the next frame of the videos; vision
    tokens get (cur, cur + row, cur + col) and cur advances by max(h, w) / merge. Grids are consumed
    in order across the batch. Padded positions are 0; rope_delta = max(pos) + 1 - unpadded length.
    A run covering several back-to-back items consumes grids until their token counts add up.
    Only config.vision.spatial_merge_size is read."""
    ids = np.asarray(input_ids)
    types = np.asarray(mm_token_type_ids)
    if ids.ndim != 2 or types.shape != ids.shape:
        raise ValueError(f"input_ids {ids.shape} and mm_token_type_ids {types.shape} must both be [B, T]")
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    merge = config.vision.spatial_merge_size
    grids = {1: list(np.asarray(image_grid_thw).reshape(-1, 3)) if image_grid_thw is not None else [],
             2: list(frame_grids(video_grid_thw)) if video_grid_thw is not None else []}
    used = {1: 0, 2: 0}
    names = {1: "image", 2: "video frame"}
    position_ids = np.zeros((3,) + ids.shape, np.int64)
    deltas = np.zeros(ids.shape[0], np.int64)
    for b in range(ids.shape[0]):
        row_types = types[b][mask[b]]
        cur, chunks = 0, []
        for kind, run in itertools.groupby(row_types.tolist()):
            length = len(list(run))
            if kind == 0:
                chunks.append(np.broadcast_to(np.arange(length) + cur, (3, length)))
                cur += length
                continue
            if kind not in grids:
                raise ValueError(f"mm_token_type_ids holds {kind}; expected 0 (text), 1 (image), 2 (video)")
            while length > 0:
                if used[kind] >= len(grids[kind]):
                    raise ValueError(f"more {names[kind]} tokens in the prompt than {names[kind]} grids given")
                grid = grids[kind][used[kind]]
                used[kind] += 1
                pos, cur = _vision_run_positions(cur, grid, merge)
                if pos.shape[1] > length:
                    raise ValueError(f"a run of {names[kind]} tokens is shorter than its grid "
                                     f"{tuple(int(g) for g in grid)} needs ({pos.shape[1]} tokens)")
                chunks.append(pos)
                length -= pos.shape[1]
        row_pos = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
        position_ids[:, b, mask[b]] = row_pos
        deltas[b] = (row_pos.max() + 1 if row_pos.size else 0) - row_pos.shape[1]
    for kind in (1, 2):
        if used[kind] != len(grids[kind]):
            raise ValueError(f"{len(grids[kind])} {names[kind]} grids given but the prompt has tokens for "
                             f"{used[kind]}")
    return position_ids, deltas
