"""The ViT + adapter against HF: patch coordinates, position-table resampling, merged features."""

import jax
import numpy as np
import pytest
import torch
from transformers import vision_utils
from transformers.models.glm4v import modeling_glm4v as hf_dense

from glmv_jax.batch import patch_layout
from glmv_jax.models import glmv, vision

GRIDS = [(1, 4, 6), (1, 8, 4), (1, 10, 12), (2, 4, 4)]


def test_patch_layout_matches_hf():
    layout = patch_layout(GRIDS)
    ref = vision_utils.get_vision_position_ids(torch.tensor(GRIDS), 2)
    np.testing.assert_array_equal(layout["patch_pos"], ref.numpy())
    sizes = [h * w for t, h, w in GRIDS for _ in range(t)]
    np.testing.assert_array_equal(layout["patch_segment"], np.repeat(np.arange(1, len(sizes) + 1), sizes))
    np.testing.assert_array_equal(layout["patch_grid"], np.concatenate(
        [np.tile([h, w], (t * h * w, 1)) for t, h, w in GRIDS]))


@pytest.mark.parametrize("side,grids", [
    (8, [(1, 8, 8), (1, 4, 6), (1, 2, 2), (1, 16, 20), (1, 30, 10)]),     # the tiny table: equal, smaller, larger
    (24, [(1, 24, 24), (1, 10, 14), (1, 48, 36), (1, 2, 64), (1, 26, 22)]),  # the released 24 x 24 table
])
def test_pos_embed_resampling_matches_grid_sample(side, grids):
    """Against HF's Glm4vVisionEmbeddings (F.grid_sample bicubic, align_corners=False, border)."""
    hf_config = hf_dense.Glm4vVisionConfig(hidden_size=16, image_size=side * 14, patch_size=14)
    module = hf_dense.Glm4vVisionEmbeddings(hf_config)
    table = np.random.default_rng(side).standard_normal((side * side, 16)).astype(np.float32)
    with torch.no_grad():
        module.position_embedding.weight.copy_(torch.from_numpy(table))
    layout = patch_layout(grids)
    n = len(layout["patch_pos"])
    pos = torch.from_numpy(layout["patch_pos"].astype(np.int64))
    with torch.no_grad():
        ref = module(torch.zeros(n, 16), [t * h * w for t, h, w in grids], torch.tensor(grids), pos[:, 0], pos[:, 1])
    ours = np.asarray(jax.jit(vision.resample_pos_embed)(table, layout["patch_pos"], layout["patch_grid"]))
    # fp32 op order mirrors PyTorch's; what is left is XLA's FMA contraction (eager: <= 2 ulp).
    assert np.abs(ours - ref.numpy()).max() <= 2e-6 * np.abs(ref.numpy()).max()
    # jax.image.resize (a=-0.5, antialiased when shrinking) is a different kernel, and this check sees it.
    offset, (h, w) = grids[0][1] * grids[0][2], grids[1][1:]
    pos = layout["patch_pos"][offset:offset + h * w]
    resized = np.asarray(jax.image.resize(table.reshape(side, side, 16), (h, w, 16), "bicubic"))[pos[:, 0], pos[:, 1]]
    assert np.abs(resized - ref.numpy()[offset:offset + h * w]).max() > 1e-3


def test_vision_features_match_hf(config, hf_model, params):
    """Merger output per image and per video against HF get_image_features / get_video_features."""
    rng = np.random.default_rng(3)
    images, video = GRIDS[:3], GRIDS[3:]
    pix = lambda grids: rng.standard_normal((sum(t * h * w for t, h, w in grids), config.vision.patch_dim)).astype(
        np.float32)
    pixel_images, pixel_video = pix(images), pix(video)
    with torch.no_grad():
        ref = list(hf_model.model.get_image_features(torch.from_numpy(pixel_images), torch.tensor(images)
                                                     ).pooler_output)
        ref += list(hf_model.model.get_video_features(torch.from_numpy(pixel_video), torch.tensor(video)
                                                      ).pooler_output)
    ours = glmv.vision_features(config, params, np.concatenate([pixel_images, pixel_video]), np.array(GRIDS))
    assert [o.shape for o in ours] == [tuple(r.shape) for r in ref]
    for out, r in zip(ours, ref):
        r = r.numpy()
        assert np.abs(out - r).max() / np.abs(r).max() <= 1e-4
