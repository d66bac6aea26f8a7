"""The ViT and the adapter (architecture.md section 2): patch rows in, merged visual tokens out.

pixel rows [N, Pd] -> patch_embed -> RMSNorm -> + bicubic-resampled position table -> depth x ViT
block (block-diagonal attention per image / video frame, 2D rope) -> RMSNorm -> 2x2 downsample ->
merger (proj, LayerNorm, GELU, SwiGLU) -> [N/4, O]. Every image and every temporal patch of a video
is an independent "frame" with its own attention segment and its own position-table resampling.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from glmv_jax.config import ModelConfig, VisionConfig
from glmv_jax.models.layers import (INIT_STD, Kernel, LayerNorm, RMSNorm, SwiGLU, dot_product_attention, linear,
                                    make_stack, normal_init, param, run_stack, segment_mask)
from glmv_jax.models.rope import apply_vision_rope, vision_rope_tables

CUBIC_A = -0.75   # PyTorch's bicubic kernel constant


# ----------------------------------------------------------------------------------------------
# Per-patch layout (numpy preprocessing)

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


# ----------------------------------------------------------------------------------------------
# Position table resampling: F.grid_sample(bicubic, align_corners=False, padding_mode="border")

def _cubic_coefficients(t: jax.Array) -> jax.Array:
    """Keys cubic weights [..., 4] of the taps at floor-1 .. floor+2 for fractional offset t (torch's order)."""
    a = CUBIC_A
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a        # 1 < |d| < 2
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1             # |d| <= 1
    return jnp.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def resample_pos_embed(table: jax.Array, patch_pos: jax.Array, patch_grid: jax.Array) -> jax.Array:
    """table [S*S, D]; patch_pos, patch_grid [N, 2] int -> [N, D] fp32: the table seen as an S x S image,
    bicubically sampled at each patch centre of its own (h, w) grid. Mirrors PyTorch's fp32 op order."""
    side = int(round(table.shape[0] ** 0.5))
    image = table.astype(jnp.float32).reshape(side, side, -1)

    def source(index, size):      # normalize to [-1, 1] (as HF) then unnormalize (as grid_sample)
        normalized = ((index.astype(jnp.float32) + 0.5) / size.astype(jnp.float32)) * 2 - 1
        coord = (normalized + 1) * jnp.float32(side / 2) - 0.5
        base = jnp.floor(coord)
        taps = jnp.clip(base.astype(jnp.int32)[:, None] + jnp.arange(-1, 3), 0, side - 1)
        return taps, _cubic_coefficients(coord - base)

    ys, wy = source(patch_pos[:, 0], patch_grid[:, 0])
    xs, wx = source(patch_pos[:, 1], patch_grid[:, 1])
    taps = image[ys[:, :, None], xs[:, None, :]]                            # [N, 4, 4, D], one gather
    wx, wy = wx[:, :, None], wy[:, :, None]
    rows = [wx[:, 0] * taps[:, i, 0] + wx[:, 1] * taps[:, i, 1] + wx[:, 2] * taps[:, i, 2] + wx[:, 3] * taps[:, i, 3]
            for i in range(4)]    # along x within each of the 4 tap rows, then along y (PyTorch's order)
    return wy[:, 0] * rows[0] + wy[:, 1] * rows[1] + wy[:, 2] * rows[2] + wy[:, 3] * rows[3]


# ----------------------------------------------------------------------------------------------
# Modules

class PositionTable(nnx.Module):
    def __init__(self, v: VisionConfig, rngs: nnx.Rngs | None = None):
        self.embedding = param(rngs, normal_init(INIT_STD), (v.num_positions, v.hidden_size),
                               ("vit_pos", "vit_embed"))

    def __call__(self, patch_pos: jax.Array, patch_grid: jax.Array) -> jax.Array:
        return resample_pos_embed(self.embedding[...], patch_pos, patch_grid)


class VisionAttention(nnx.Module):
    """Non-causal, block-diagonal MHA with 2D rope; qkv kernel (Dv, 3, Nv, Hv), out kernel (Nv, Hv, Dv)."""

    def __init__(self, v: VisionConfig, rngs: nnx.Rngs | None = None):
        self.head_dim = v.head_dim
        self.qkv = Kernel((v.hidden_size, 3, v.num_heads, v.head_dim), ("vit_embed", "qkv", "vit_heads", "head_dim"),
                          rngs)
        self.out = Kernel((v.num_heads, v.head_dim, v.hidden_size), ("vit_heads", "head_dim", "vit_embed"), rngs)

    def __call__(self, x, cos, sin, mask):
        w = self.qkv.kernel[...].astype(x.dtype)
        q, k, v = (jnp.einsum("BTD,DNH->BTNH", x, w[:, i]) for i in range(3))
        q, k = apply_vision_rope(q, cos, sin), apply_vision_rope(k, cos, sin)
        ctx = dot_product_attention(q, k, v, mask, self.head_dim ** -0.5)
        return jnp.einsum("BTNH,NHD->BTD", ctx, self.out.kernel[...].astype(x.dtype))


class VisionBlock(nnx.Module):
    """x += attn(norm1(x)); x += mlp(norm2(x)). The MLP width is out_hidden_size."""

    def __init__(self, v: VisionConfig, rngs: nnx.Rngs | None = None):
        self.norm1 = RMSNorm(v.hidden_size, v.rms_norm_eps, "vit_embed", rngs)
        self.norm2 = RMSNorm(v.hidden_size, v.rms_norm_eps, "vit_embed", rngs)
        self.attn = VisionAttention(v, rngs)
        self.mlp = SwiGLU(v.hidden_size, v.out_hidden_size, "vit_embed", "vit_mlp", rngs)

    def __call__(self, x, cos, sin, mask):
        x = x + checkpoint_name(self.attn(self.norm1(x), cos, sin, mask), "attn_out")
        return x + self.mlp(self.norm2(x))


class Merger(nnx.Module):
    """proj -> LayerNorm -> exact GELU -> SwiGLU (width intermediate_size); no residual, no biases."""

    def __init__(self, v: VisionConfig, rngs: nnx.Rngs | None = None):
        o = v.out_hidden_size
        self.proj = linear(o, o, ("embed", None), rngs=rngs)
        self.norm = LayerNorm(o, v.rms_norm_eps, "embed", rngs)
        self.gate = linear(o, v.intermediate_size, ("embed", "mlp"), rngs=rngs)
        self.up = linear(o, v.intermediate_size, ("embed", "mlp"), rngs=rngs)
        self.down = linear(v.intermediate_size, o, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x):
        y = jax.nn.gelu(self.norm(self.proj(x)), approximate=False)
        return self.down(jax.nn.silu(self.gate(y)) * self.up(y))


class VisionTower(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None = None):
        v = self.v = config.vision
        self.dtype = jnp.dtype(config.dtype)
        self.scan, self.remat = config.scan_layers, config.remat
        self.patch_embed = linear(v.patch_dim, v.hidden_size, ("vit_patch", "vit_embed"), bias=True, rngs=rngs)
        self.pos_embed = PositionTable(v, rngs)
        self.post_conv_norm = RMSNorm(v.hidden_size, v.rms_norm_eps, "vit_embed", rngs)
        self.blocks = make_stack(lambda r: VisionBlock(v, r), v.depth, rngs)
        self.post_norm = RMSNorm(v.hidden_size, v.rms_norm_eps, "vit_embed", rngs)
        self.downsample = linear(4 * v.hidden_size, v.out_hidden_size, ("vit_embed", "embed"), bias=True, rngs=rngs)
        self.merger = Merger(v, rngs)

    def __call__(self, pixel_values, patch_pos, patch_grid, patch_segment) -> jax.Array:
        """pixel_values [N, Pd]; patch_pos, patch_grid [N, 2]; patch_segment [N] -> [N/4, O] merged tokens."""
        v = self.v
        x = self.post_conv_norm(self.patch_embed(pixel_values.astype(self.dtype)))
        x = x + self.pos_embed(patch_pos, patch_grid).astype(self.dtype)
        cos, sin = vision_rope_tables(patch_pos, v.head_dim, v.rope_theta)
        mask = segment_mask(patch_segment[None], patch_segment[None])
        x, _ = run_stack(self.blocks, x[None], lambda blk, h: (blk(h, cos, sin, mask), ()), scan=self.scan,
                         remat=self.remat)
        x = x[0]
        x = self.post_norm(x)
        x = self.downsample(x.reshape(-1, 4 * v.hidden_size))
        return self.merger(x)
