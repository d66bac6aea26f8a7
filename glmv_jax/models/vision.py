"""The ViT and the adapter: patch rows in, merged visual tokens out.

pixel rows [N, Pd] -> patch_embed -> RMSNorm -> + bicubic-resampled position table -> depth x ViT
block (attention per image / video frame, 2D rope) -> RMSNorm -> 2x2 downsample -> merger (proj,
LayerNorm, GELU, SwiGLU) -> [N/4, O]. Every image and every temporal patch of a video is an independent
"frame" with its own attention segment and its own position-table resampling.

Attention runs frame by frame: `patch_frames` [F, L] (glmv_jax.batch.frame_slots, host side) lays the patch
rows out as slots (frames packed into rows of L, then empty slots). The tower gathers its inputs (pixel rows,
positions) into that slot layout once, runs every block on the F * L slots (attention.attend over the F frame
rows; on CPU one (frame, head) pair at a time, in query blocks whose scores stay in cache), and takes the patch
rows back after the last norm: no gather per block (on a sharded batch each would all-gather the whole
[N, Nv, Hv] q/k/v onto every device). Without that layout all patch rows form one frame with a same-segment
mask: the same values at O(N^2) cost.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from glmv_jax.config import ModelConfig, VisionConfig
from glmv_jax.models import attention
from glmv_jax.models.layers import (INIT_STD, Kernel, LayerNorm, RMSNorm, SwiGLU, contract, linear, make_stack,
                                    normal_init, param, run_stack)
from glmv_jax.models.rope import apply_vision_rope, vision_rope_tables
from glmv_jax.sharding.rules import constrain

CUBIC_A = -0.75   # PyTorch's bicubic kernel constant
QUERY_BLOCK = 256  # ViT attention query rows per step: [256, L] fp32 scores stay in cache


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


class FrameLayout(NamedTuple):
    """Where each patch row sits in the [F, L] frame slots (built once per call, shared by the blocks)."""
    rows: jax.Array      # [F, L] int: the patch row in each slot (0 in empty slots)
    segment: jax.Array   # [F, L] int: that row's patch_segment, -1 in empty slots
    slot: jax.Array      # [N] int: each row's flat slot f * L + i; F * L for rows in no frame


def frame_layout(patch_segment: jax.Array, patch_frames: jax.Array | None) -> FrameLayout:
    """patch_segment [N]; patch_frames [F, L] (batch.frame_slots) or None: all rows one frame, masked by segment."""
    patch_segment = jnp.asarray(patch_segment)
    n = patch_segment.shape[0]
    patch_frames = jnp.arange(n, dtype=jnp.int32)[None] if patch_frames is None else jnp.asarray(patch_frames)
    f, l = patch_frames.shape
    valid = patch_frames >= 0
    rows = jnp.where(valid, patch_frames, 0)
    segment = jnp.where(valid, patch_segment[rows], -1)
    slot = jnp.full((n,), f * l, jnp.int32).at[jnp.where(valid, patch_frames, n).reshape(-1)].set(
        jnp.arange(f * l, dtype=jnp.int32), mode="drop")
    return FrameLayout(rows, segment, slot)


def frame_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: FrameLayout, scale: float,
                    block: int = QUERY_BLOCK, impl: str = "auto") -> jax.Array:
    """q, k, v [N, Nv, Hv] per patch row -> [N, Nv, Hv]: attention inside each frame of `layout`.

    q/k/v are gathered into the [F, L] frame slots and attention.attend (implementation `impl`) runs frames
    as its rows (keys of empty slots or of another segment masked; fp32 scores and softmax, probabilities
    in v's dtype as in HF's eager attention). Rows in no frame (padding) get zeros."""
    rows = layout.rows.reshape(-1)
    q, k, v = (jnp.take(jnp.asarray(a), rows, axis=0) for a in (q, k, v))
    out = slot_attention(q, k, v, layout, scale, block, impl)                              # [F * L, Nv, Hv]
    return to_patch_rows(out, layout)


def slot_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: FrameLayout, scale: float,
                   block: int = QUERY_BLOCK, impl: str = "auto") -> jax.Array:
    """q, k, v [F * L, Nv, Hv] already in the slot layout -> [F * L, Nv, Hv]: attention.attend with the F
    frame rows as its batch (keys of empty slots or of another segment masked)."""
    f, l = layout.rows.shape
    qf, kf, vf = (a.reshape(f, l, *a.shape[1:]) for a in (q, k, v))
    out = attention.attend(qf, kf, vf, layout.segment, layout.segment, scale, causal=False, impl=impl, block=block)
    return out.reshape(q.shape)


def to_patch_rows(x: jax.Array, layout: FrameLayout) -> jax.Array:
    """[F * L, ...] slot values -> [N, ...] per patch row; rows in no frame (padding) get zeros."""
    return jnp.take(x, layout.slot, axis=0, mode="fill", fill_value=0)


class VisionAttention(nnx.Module):
    """Non-causal MHA inside each frame with 2D rope; qkv kernel (Dv, 3, Nv, Hv), out kernel (Nv, Hv, Dv)."""

    def __init__(self, v: VisionConfig, rngs: nnx.Rngs | None = None, impl: str = "auto"):
        self.head_dim, self.impl = v.head_dim, attention.check_impl(impl)
        self.qkv = Kernel((v.hidden_size, 3, v.num_heads, v.head_dim), ("vit_embed", "qkv", "vit_heads", "head_dim"),
                          rngs)
        self.out = Kernel((v.num_heads, v.head_dim, v.hidden_size), ("vit_heads", "head_dim", "vit_embed"), rngs)

    def __call__(self, x, cos, sin, layout: FrameLayout):
        """x [F * L, Dv] in the slot layout -> [F * L, Dv]."""
        w = self.qkv.kernel[...].astype(x.dtype)
        q, k, v = (contract(x, w[:, i], 1) for i in range(3))                            # TD,DNH->TNH
        q, k = apply_vision_rope(q, cos, sin), apply_vision_rope(k, cos, sin)
        ctx = slot_attention(q, k, v, layout, self.head_dim ** -0.5, impl=self.impl)
        return contract(ctx, self.out.kernel[...].astype(x.dtype), 2)                       # TNH,NHD->TD


class VisionBlock(nnx.Module):
    """x += attn(norm1(x)); x += mlp(norm2(x)). The MLP width is out_hidden_size."""

    def __init__(self, v: VisionConfig, rngs: nnx.Rngs | None = None, attention_impl: str = "auto"):
        self.norm1 = RMSNorm(v.hidden_size, v.rms_norm_eps, "vit_embed", rngs)
        self.norm2 = RMSNorm(v.hidden_size, v.rms_norm_eps, "vit_embed", rngs)
        self.attn = VisionAttention(v, rngs, attention_impl)
        self.mlp = SwiGLU(v.hidden_size, v.out_hidden_size, "vit_embed", "vit_mlp", rngs)

    def __call__(self, x, cos, sin, layout: FrameLayout):
        x = x + checkpoint_name(self.attn(self.norm1(x), cos, sin, layout), "attn_out")
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
        self.blocks = make_stack(lambda r: VisionBlock(v, r, config.attention), v.depth, rngs)
        self.post_norm = RMSNorm(v.hidden_size, v.rms_norm_eps, "vit_embed", rngs)
        self.downsample = linear(4 * v.hidden_size, v.out_hidden_size, ("vit_embed", "embed"), bias=True, rngs=rngs)
        self.merger = Merger(v, rngs)

    def __call__(self, pixel_values, patch_pos, patch_grid, patch_segment, patch_frames=None) -> jax.Array:
        """pixel_values [N, Pd]; patch_pos, patch_grid [N, 2]; patch_segment [N]; patch_frames [F, L] or None
        (batch.frame_slots) -> [N/4, O] merged tokens. The blocks run on the F * L frame slots (empty slots hold
        patch row 0's input, masked out of attention); without patch_frames the slots are the patch rows."""
        v = self.v
        layout = frame_layout(patch_segment, patch_frames)
        pixels = pixel_values.astype(self.dtype)
        if patch_frames is not None:           # inputs into the slot layout: the only gather (no gradient)
            rows = layout.rows.reshape(-1)
            pixels, patch_pos, patch_grid = (jnp.take(jnp.asarray(a), rows, axis=0)
                                             for a in (pixels, patch_pos, patch_grid))
        x = self.post_conv_norm(self.patch_embed(pixels))
        x = x + self.pos_embed(patch_pos, patch_grid).astype(self.dtype)
        x = constrain(x, ("act_tokens", "act_embed"))
        cos, sin = vision_rope_tables(patch_pos, v.head_dim, v.rope_theta)
        block = lambda blk, h: (constrain(blk(h, cos, sin, layout), ("act_tokens", "act_embed")), ())
        x, _ = run_stack(self.blocks, x, block, scan=self.scan, remat=self.remat)
        x = self.post_norm(x)
        if patch_frames is not None:
            x = to_patch_rows(x, layout)
        x = self.downsample(x.reshape(-1, 4 * v.hidden_size))
        return self.merger(x)
