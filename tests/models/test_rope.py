"""Rope tables and get_rope_index against HF (integer outputs exactly equal; tables to fp32 rounding)."""

import numpy as np
import pytest
import torch
from transformers.models.glm4v import modeling_glm4v as hf_dense
from transformers.models.glm4v_moe import modeling_glm4v_moe as hf_moe

from glmv_jax.batch import get_rope_index
from glmv_jax.config import tiny
from glmv_jax.models import rope
from glmv_jax.models.glmv import token_types
from tests.hf_oracle import multimodal_inputs
from tests.models.conftest import pad_prompts


def test_rope_index_worked_example(config):
    """docs/models.md section 7: image (1,4,6) then video (2,4,4) between text."""
    a, boi, eoi, bov, eov, img = 5, config.image_start_token_id, config.image_end_token_id, \
        config.video_start_token_id, config.video_end_token_id, config.image_token_id
    ids = [a, a, a, boi] + [img] * 6 + [eoi, a, a, bov, boi] + [img] * 4 + [eoi, 7, boi] + [img] * 4 + \
          [eoi, 8, eov, a, a]
    ids = np.array([ids])
    pos, delta = get_rope_index(config, ids, token_types(config, ids), np.array([[1, 4, 6]]),
                                     np.array([[2, 4, 4]]))
    expect_t = [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9, 10, 11, 12, 12, 12, 12, 14, 15, 16, 17, 17, 17, 17, 19,
                20, 21, 22, 23]
    expect_h = [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9, 10, 11, 12, 12, 13, 13, 14, 15, 16, 17, 17, 18, 18, 19,
                20, 21, 22, 23]
    expect_w = [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 12, 13, 14, 15, 16, 17, 18, 17, 18, 19,
                20, 21, 22, 23]
    np.testing.assert_array_equal(pos[:, 0], [expect_t, expect_h, expect_w])
    np.testing.assert_array_equal(delta, [-7])


LAYOUTS = {
    "text": [[]],
    "image": [[("image", (1, 4, 6))]],
    "video": [[("video", (2, 4, 4))]],
    "images_of_different_sizes": [[("image", (1, 4, 6)), ("image", (1, 8, 4)), ("image", (1, 10, 12))]],
    "image_and_video": [[("video", (3, 6, 4)), ("image", (1, 2, 8))]],
    "left_padded": [[("image", (1, 4, 6))], [("image", (1, 6, 6)), ("video", (2, 4, 4))], []],
    "right_padded": [[], [("image", (1, 8, 6))], [("video", (1, 4, 4)), ("image", (1, 2, 2))]],
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_rope_index_matches_hf(name, config, hf_model):
    prompts = [multimodal_inputs(config, spans, seed=i, text_len=2 + i) for i, spans in enumerate(LAYOUTS[name])]
    batch = pad_prompts(prompts, "right" if name == "right_padded" else "left")
    grids = {k: batch.get(k) for k in ("image_grid_thw", "video_grid_thw")}
    pos, delta = get_rope_index(config, batch["input_ids"], batch["mm_token_type_ids"],
                                     attention_mask=batch["attention_mask"], **grids)
    torch_in = lambda x: None if x is None else torch.from_numpy(x)
    ref_pos, ref_delta = hf_model.model.get_rope_index(
        torch_in(batch["input_ids"]), torch_in(batch["mm_token_type_ids"]),
        **{k: torch_in(v) for k, v in grids.items()}, attention_mask=torch_in(batch["attention_mask"]))
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(-1))
    np.testing.assert_array_equal(token_types(config, batch["input_ids"]), batch["mm_token_type_ids"])


def test_rope_index_errors(config):
    p = multimodal_inputs(config, [("image", (1, 4, 6))])
    ids, types = p["input_ids"], p["mm_token_type_ids"]
    with pytest.raises(ValueError, match="more image tokens"):
        get_rope_index(config, ids, types)
    with pytest.raises(ValueError, match="2 image grids given"):
        get_rope_index(config, ids, types, np.array([[1, 4, 6], [1, 2, 2]]))
    with pytest.raises(ValueError, match="shorter than its grid"):
        get_rope_index(config, ids, types, np.array([[1, 8, 6]]))
    with pytest.raises(ValueError, match="mm_token_type_ids holds 3"):
        get_rope_index(config, ids, np.where(types == 1, 3, types), np.array([[1, 4, 6]]))


def test_back_to_back_images_consume_two_grids(config):
    """One run of image tokens covering two images (no separator): grids are consumed in turn."""
    ids = np.array([[5] + [config.image_token_id] * 10 + [5]])
    pos, delta = get_rope_index(config, ids, token_types(config, ids), np.array([[1, 4, 4], [1, 4, 6]]))
    np.testing.assert_array_equal(pos[:, 0, :5], [[0, 1, 1, 1, 1], [0, 1, 1, 2, 2], [0, 1, 2, 1, 2]])
    np.testing.assert_array_equal(pos[:, 0, 5:11], [[3] * 6, [3, 3, 3, 4, 4, 4], [3, 4, 5, 3, 4, 5]])
    np.testing.assert_array_equal(pos[:, 0, 11], [6, 6, 6])
    np.testing.assert_array_equal(delta, [7 - 12])


@pytest.mark.parametrize("moe", [False, True])
def test_text_rope_matches_hf(moe):
    config = tiny(moe=moe)
    t = config.text
    hf = hf_moe if moe else hf_dense
    hf_config = (hf.Glm4vMoeTextConfig if moe else hf.Glm4vTextConfig)(
        hidden_size=t.hidden_size, num_attention_heads=t.num_attention_heads, head_dim=t.dim_per_head,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section),
                         "partial_rotary_factor": t.partial_rotary_factor})
    rotary = (hf.Glm4vMoeTextRotaryEmbedding if moe else hf.Glm4vTextRotaryEmbedding)(hf_config)
    rng = np.random.default_rng(0)
    positions = rng.integers(0, 3000, size=(3, 2, 7))
    q = rng.standard_normal((2, t.num_attention_heads, 7, t.dim_per_head)).astype(np.float32)
    k = rng.standard_normal((2, t.num_key_value_heads, 7, t.dim_per_head)).astype(np.float32)
    cos, sin = rotary(torch.from_numpy(q), torch.from_numpy(positions))
    ref_q, ref_k = hf.apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), cos, sin)
    our_cos, our_sin = rope.text_rope_tables(positions, t, np.float32)
    np.testing.assert_allclose(our_cos, cos.numpy(), atol=2e-6)
    ours = [rope.apply_text_rope(x.transpose(0, 2, 1, 3), our_cos, our_sin, t.rope_layout) for x in (q, k)]
    for out, ref in zip(ours, (ref_q, ref_k)):
        np.testing.assert_allclose(np.asarray(out).transpose(0, 2, 1, 3), ref.numpy(), atol=1e-5)


def test_vision_rope_matches_hf(config):
    v = config.vision
    hf_config = hf_dense.Glm4vVisionConfig(hidden_size=v.hidden_size, num_heads=v.num_heads)
    rotary = hf_dense.Glm4vVisionRotaryEmbedding(hf_config)
    rng = np.random.default_rng(1)
    pos = rng.integers(0, 40, size=(11, 2))
    q = rng.standard_normal((11, v.num_heads, v.head_dim)).astype(np.float32)
    cos, sin = rotary(torch.from_numpy(q), torch.from_numpy(pos))
    ref, _ = hf_dense.apply_rotary_pos_emb_vision(torch.from_numpy(q), torch.from_numpy(q), cos, sin)
    our_cos, our_sin = rope.vision_rope_tables(pos, v.head_dim, v.rope_theta)
    out = rope.apply_vision_rope(q[None], our_cos, our_sin)[0]
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)
