"""Blocked attention (decoder and ViT) against the plain masked reference, and the ViT on frame slots (batch.frame_slots
itself: tests/test_batch.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmv_jax.batch import frame_slots, patch_layout
from glmv_jax.models import glmv
from glmv_jax.models.layers import blocked_attention, causal_segment_mask, dot_product_attention

RNG = np.random.default_rng(0)


def _qkv(b, t, n, k, h):
    return (jnp.asarray(RNG.standard_normal(shape).astype(np.float32))
            for shape in ((b, t, n, h), (b, t, k, h), (b, t, k, h)))


@pytest.mark.parametrize("per_pair", [True, False])
@pytest.mark.parametrize("block,max_blocks", [(8, 16), (128, 16), (8, 3)])
def test_causal_blocked_matches_masked_reference(per_pair, block, max_blocks):
    """Packed segments, right and left padding, GQA; uneven last block; block count capped."""
    b, t, n, k, h = 3, 37, 6, 2, 8
    q, kk, v = _qkv(b, t, n, k, h)
    seg = np.zeros((b, t), np.int32)
    seg[0] = np.repeat([1, 2, 3], [10, 20, 7])
    seg[1, :30] = np.repeat([1, 2], [5, 25])          # right padding
    seg[2, 4:] = 1                                     # left padding
    index = jnp.broadcast_to(jnp.arange(t), (b, t))
    ref = dot_product_attention(q, kk, v, causal_segment_mask(index, index, seg, seg), h ** -0.5)
    out = jax.jit(lambda *a: blocked_attention(*a, seg, seg, h ** -0.5, causal=True, block=block,
                                               max_blocks=max_blocks, per_pair=per_pair))(q, kk, v)
    real = seg > 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("per_pair", [True, False])
def test_bidirectional_blocked_matches_segment_masked_reference(per_pair):
    b, t, n, h = 2, 29, 4, 8
    q, k, v = _qkv(b, t, n, n, h)
    seg = np.stack([np.repeat([1, 2, 0], [12, 11, 6]), np.repeat([-1, 3, 4], [3, 16, 10])]).astype(np.int32)
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    ref = dot_product_attention(q, k, v, jnp.asarray(mask), 0.3)
    out = blocked_attention(q, k, v, seg, seg, 0.3, causal=False, block=8, per_pair=per_pair)
    real = seg > 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-6)


def test_vit_with_frame_slots_equals_segment_masked_vit(config, params):
    """Frames of different sizes packed into shared rows, an empty row, padding rows: the values of the
    one-frame segment-masked ViT."""
    grids = [(1, 4, 6), (2, 4, 4), (1, 2, 2)]
    layout = patch_layout(grids)
    n = len(layout["patch_segment"])
    pad = 12
    layout = {key: np.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=1 if key == "patch_grid" else 0)
              for key, a in layout.items()}
    pixels = RNG.standard_normal((n + pad, config.vision.patch_dim)).astype(np.float32)
    run = glmv._jitted_vision(config)
    plain = np.asarray(run(params, pixels, **layout))
    framed = np.asarray(run(params, pixels, **layout, patch_frames=frame_slots(layout["patch_segment"], 4, 28)))
    np.testing.assert_allclose(framed[:n // 4], plain[:n // 4], rtol=1e-5, atol=1e-5 * np.abs(plain).max())
