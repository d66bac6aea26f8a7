"""Rotary position embeddings: the ViT's axial 2D rope and the decoder's 3D M-RoPE tables (the positions
themselves, `get_rope_index`, are host-side batch contract: glmv_jax/batch.py).

Conventions (all load-bearing, as HF):
* ViT: angles per token `[h*inv, w*inv, h*inv, w*inv]` over the whole head dim, rotate_half pairing
  (i, i + H/2); cos/sin fp32, q and k upcast to fp32, rotated, cast back.
* Decoder: only the first `rotary_dim` dims rotate; the rotary_dim/2 frequencies are split by
  mrope_section into chunks taking the t, h, w position streams (chunk i -> stream i % 3). Dense
  GLM-4 pairs (2j, 2j+1) ("interleaved"); the MoE decoder pairs (j, j + rotary_dim/2) ("half").
  cos/sin are fp32 and cast to the activation dtype before the rotation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from glmv_jax.config import TextConfig


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

