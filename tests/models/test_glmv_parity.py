"""Whole-model logits against HF Glm4vForConditionalGeneration (fp32, tiny config, O(1) weights)."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from glmv_jax.config import tiny
from glmv_jax.convert.hf import hf_state_dict_to_params
from glmv_jax.models import glmv
from tests.hf_oracle import build_hf_model, hf_logits, multimodal_inputs
from tests.models.conftest import pad_prompts

TOL = 1e-4      # max|diff| / max|ref|; measured ~1e-6

PROMPTS = {
    "text": [],
    "image": [("image", (1, 4, 6))],
    "video": [("video", (2, 4, 4))],
    "images_of_different_sizes": [("image", (1, 4, 6)), ("image", (1, 8, 4)), ("image", (1, 10, 12))],
}


def rel_err(out, ref) -> float:
    return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", list(PROMPTS))
def test_logits_match_hf(name, config, hf_model, params):
    inputs = multimodal_inputs(config, PROMPTS[name])
    out = glmv.forward(config, params, **inputs)
    assert out.dtype == jnp.float32 and out.shape == inputs["input_ids"].shape + (config.text.vocab_size,)
    assert rel_err(out, hf_logits(hf_model, inputs)) <= TOL


@pytest.mark.parametrize("padding", ["left", "right"])
def test_padded_batch_matches_hf(padding, config, hf_model, params):
    """Rows of different lengths (one text-only) padded with attention_mask zeros; valid positions compared."""
    spans = [[("image", (1, 4, 6))], [], [("image", (1, 6, 6)), ("image", (1, 2, 4))]]   # HF: no image + video
    batch = pad_prompts([multimodal_inputs(config, s, seed=i, text_len=2 + 2 * i) for i, s in enumerate(spans)],
                        padding)
    assert (batch["attention_mask"] == 0).any()
    valid = batch["attention_mask"].astype(bool)
    out = np.asarray(glmv.forward(config, params, **batch))
    ref = hf_logits(hf_model, batch)
    assert rel_err(out[valid], ref[valid]) <= TOL
    assert np.isfinite(out).all()


def test_image_and_video_in_one_prompt(config, hf_model, params):
    """HF cannot place both in one forward; the reference is HF's own pieces: its vision features put at
    the image / video token types, its get_rope_index positions, then its decoder on inputs_embeds."""
    inputs = multimodal_inputs(config, [("video", (2, 4, 4)), ("image", (1, 4, 6)), ("video", (1, 6, 4))])
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    model = hf_model.model
    with torch.no_grad():
        embeds = model.get_input_embeddings()(t["input_ids"])
        embeds[t["mm_token_type_ids"] == 1] = torch.cat(
            model.get_image_features(t["pixel_values"], t["image_grid_thw"]).pooler_output)
        embeds[t["mm_token_type_ids"] == 2] = torch.cat(
            model.get_video_features(t["pixel_values_videos"], t["video_grid_thw"]).pooler_output)
        positions, _ = model.get_rope_index(t["input_ids"], t["mm_token_type_ids"], t["image_grid_thw"],
                                            t["video_grid_thw"], t["attention_mask"])
        ref = hf_model(inputs_embeds=embeds, position_ids=positions, attention_mask=t["attention_mask"]).logits
    derived = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}     # token types from input_ids
    assert rel_err(glmv.forward(config, params, **derived), ref.numpy()) <= TOL


def test_scan_equals_unrolled(config, params):
    """Text-only (the ViT blocks go through the same run_stack)."""
    inputs = multimodal_inputs(config, PROMPTS["text"])
    scanned = np.asarray(glmv.forward(config, params, **inputs))
    unrolled = np.asarray(glmv.forward(config.replace(scan_layers=False), params, **inputs))
    np.testing.assert_allclose(unrolled, scanned, rtol=0, atol=1e-6 * np.abs(scanned).max())


def test_grad_through_forward_is_finite(config, params):
    """jax.grad of a next-token loss through vision + decoder, with remat: finite, reaching the ViT,
    and the remat loss equals the plain forward's."""
    inputs = multimodal_inputs(config, PROMPTS["image"])
    batch, _ = glmv.prepare_inputs(config, **inputs)
    targets = jnp.asarray(np.roll(batch["input_ids"], -1, axis=1))

    def loss(p, cfg):
        logits = glmv.apply(cfg, p, batch)[:, :-1]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, :-1, None], -1))

    remat = config.replace(remat="save_dots_except_mlp")
    step = jax.jit(jax.value_and_grad(lambda p: loss(p, remat))).lower(params)
    fast_compile = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    value, grads = step.compile(compiler_options=fast_compile)(params)     # same math, ~35% less compile
    flat = jax.tree.leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in flat)
    assert float(jnp.abs(grads["vision"]["blocks"]["attn"]["qkv"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["vision"]["pos_embed"]["embedding"]).max()) > 0
    logits = np.asarray(glmv.forward(config, params, **inputs))[:, :-1]
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expect = -np.take_along_axis(log_probs, np.asarray(targets)[:, :-1, None], -1).mean()
    np.testing.assert_allclose(float(value), expect, rtol=1e-5)


@pytest.fixture(scope="module")
def moe_model():
    config = tiny(moe=True)       # n_group 2, topk_group 1: group-limited routing is exercised
    model = build_hf_model(config, seed=1)
    return config, model, hf_state_dict_to_params({k: v.numpy() for k, v in model.state_dict().items()}, config)


@pytest.mark.parametrize("spans", [[("image", (1, 4, 6)), ("image", (1, 2, 4))], [("video", (2, 4, 4))]],
                         ids=["images", "video"])
def test_moe_decoder_logits_match_hf(moe_model, spans):
    """GLM-4.5V layout: 2-norm layers, half-split M-RoPE, dense layer 0 then routed layers (models.moe)."""
    config, model, params = moe_model
    inputs = multimodal_inputs(config, spans)
    assert rel_err(glmv.forward(config, params, **inputs), hf_logits(model, inputs)) <= TOL


def test_bf16_error_is_hf_bf16_sized(config, hf_model, params):
    """bf16 compute (fp32 master params): our error against HF fp32 is of the size of HF bf16's own."""
    inputs = multimodal_inputs(config, PROMPTS["image"])
    ref = hf_logits(hf_model, inputs)
    with torch.no_grad():
        hf_bf16 = copy.deepcopy(hf_model).to(torch.bfloat16)
        ref_bf16 = hf_bf16(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.float().numpy()
    ours = glmv.forward(config.replace(dtype="bfloat16"), params, **inputs)
    assert ours.dtype == jnp.float32
    assert rel_err(ours, ref) <= 2 * rel_err(ref_bf16, ref)
