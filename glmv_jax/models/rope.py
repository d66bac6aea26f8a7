"""Rotary position embeddings: the ViT's axial 2D rope, the decoder's 3D M-RoPE, and `get_rope_index`.

Conventions (architecture.md sections 2.4, 3.1, 4, 5.2, all load-bearing):
* ViT: angles per token `[h*inv, w*inv, h*inv, w*inv]` over the whole head dim, rotate_half pairing
  (i, i + H/2); cos/sin fp32, q and k upcast to fp32, rotated, cast back.
* Decoder: only the first `rotary_dim` dims rotate; the rotary_dim/2 frequencies are split by
  mrope_section into chunks taking the t, h, w position streams (chunk i -> stream i % 3). Dense
  GLM-4 pairs (2j, 2j+1) ("interleaved"); the MoE decoder pairs (j, j + rotary_dim/2) ("half").
  cos/sin are fp32 and cast to the activation dtype before the rotation.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from glmv_jax.config import ModelConfig, TextConfig


def inverse_frequencies(dim: int, theta: float) -> np.ndarray:
    """HF `1 / theta ** (arange(0, dim, 2) / dim)` as fp32: dim/2 entries."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (1.0 / (np.float64(theta) ** exponents.astype(np.float64))).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rotate_interleaved(x: jax.Array) -> jax.Array:
    """GPT-J rotate-every-two: out[2j] = -x[2j+1], out[2j+1] = x[2j]."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# Vision 2D rope

def vision_rope_tables(patch_pos: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """patch_pos [N, 2] int (h_idx, w_idx) -> cos, sin [N, head_dim] fp32 with angles [h, w, h, w]."""
    inv = jnp.asarray(inverse_frequencies(head_dim // 2, theta))          # head_dim/4 entries
    freqs = patch_pos.astype(jnp.float32)[:, :, None] * inv                # [N, 2, H/4]
    hw = freqs.reshape(freqs.shape[0], -1)                                 # [h freqs, w freqs]
    angles = jnp.concatenate([hw, hw], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_vision_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, N, heads, H]; cos/sin [N, H] fp32. Rotation in fp32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Text M-RoPE

def mrope_stream_of_frequency(section: tuple[int, ...]) -> np.ndarray:
    """For each of sum(section) frequencies, the position stream (0 t, 1 h, 2 w) it reads."""
    return np.concatenate([np.full(n, i % 3, np.int32) for i, n in enumerate(section)])


def text_rope_tables(position_ids: jax.Array, text: TextConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """position_ids [3, B, T] int -> cos, sin [B, T, rotary_dim] in `dtype` (computed in fp32)."""
    inv = jnp.asarray(inverse_frequencies(text.rotary_dim, text.rope_theta))
    streams = mrope_stream_of_frequency(text.mrope_section)
    pos = jnp.moveaxis(position_ids[streams], 0, -1).astype(jnp.float32)   # [B, T, rd/2]
    angles = pos * inv
    if text.rope_layout == "interleaved":
        angles = jnp.repeat(angles, 2, axis=-1)
    else:
        angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_text_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, layout: str) -> jax.Array:
    """x [B, T, heads, H]; cos/sin [B, T, rd]. Rotates x[..., :rd] in x's dtype; the rest passes."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    turned = rotate_interleaved(rot) if layout == "interleaved" else rotate_half(rot)
    return jnp.concatenate([rot * cos + turned * sin, rest], axis=-1)


# ----------------------------------------------------------------------------------------------
# get_rope_index (numpy: it is data preprocessing)

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
    A run covering several back-to-back items consumes grids until their token counts add up."""
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
