"""The train step on the real tiny MoE GLM-V (vision tower + MoE decoder): learning with the vision tower
frozen, the router correction bias moved only by the aux-loss-free rule (post_update), never by AdamW;
the result exported to HF safetensors and read back."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from glmv_jax.config import tiny
from glmv_jax.models import glmv
from glmv_jax.convert.hf import load_pretrained
from glmv_jax.models.moe_balance import update_correction_bias
from glmv_jax.train.checkpoint import export_hf
from glmv_jax.train.losses import cross_entropy
from glmv_jax.train.optimizer import build_optimizer
from glmv_jax.train.state import train_state_from_params
from glmv_jax.train.step import make_train_step
from tests.train import toy

# tiny(moe=True) trimmed for compile time: one ViT block, one dense + one MoE decoder layer.
_BASE = tiny(moe=True)
CONFIG = dataclasses.replace(_BASE, vision=dataclasses.replace(_BASE.vision, depth=1),
                             text=dataclasses.replace(_BASE.text, num_hidden_layers=2)).validate()
BIAS_RATE = 1e-2


def random_params(seed=0):
    """Numpy params of the model's tree (norm scales 1, biases 0, kernels N(0, 0.05)): no init program."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(leaf.shape, np.float32)
        if "bias" in name:
            return (0.01 * rng.standard_normal(leaf.shape)).astype(np.float32)
        return (0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, glmv.model_graph(CONFIG)[1].to_pure_dict())


def make_batch(rows=2, text_len=6):
    """Rows of text, one 4x4-patch image, text; laid out as BATCH.md; loss on text-to-text targets."""
    rng = np.random.default_rng(0)
    c = CONFIG
    image = [c.image_start_token_id] + [c.image_token_id] * 4 + [c.image_end_token_id]   # 16 patches / 2x2 merge
    ids = np.array([rng.integers(2, 200, text_len).tolist() + image + rng.integers(2, 200, text_len).tolist()
                    for _ in range(rows)], np.int32)
    pixels = rng.standard_normal((16 * rows, c.vision.patch_dim)).astype(np.float32)
    batch, _ = glmv.prepare_inputs(c, ids, pixel_values=pixels, image_grid_thw=np.array([[1, 4, 4]] * rows))
    batch["targets"] = np.concatenate([ids[:, 1:], np.zeros((rows, 1), np.int32)], 1)
    text_next = (batch["token_type"] == 0) & (np.roll(batch["token_type"], -1, axis=1) == 0)
    batch["loss_mask"] = text_next.astype(np.float32)
    batch["loss_mask"][:, -1] = 0
    return batch


def loss_fn(params, batch, rng):
    logits, aux = glmv.apply_with_aux(CONFIG, params, batch)
    loss_sum, count, _ = cross_entropy(logits, batch["targets"], batch["loss_mask"])
    moe = aux["moe"]
    return loss_sum, (count, {"moe_aux_loss": 1e-3 * jnp.mean(moe["seq_aux_loss"]), "moe_load_sum": moe["load"]})


def bias_rule(params, aux):
    router = params["text"]["moe_layers"]["moe"]["router"]
    router["correction_bias"] = update_correction_bias(router["correction_bias"], aux["moe_load_sum"], BIAS_RATE)
    return params


def test_tiny_moe_glmv_trains_with_frozen_vision_and_bias_rule(tmp_path):
    opt = build_optimizer(dict(lr=3e-3, warmup_steps=0, total_steps=20, freeze=["vision"]))
    step = make_train_step(loss_fn, opt, post_update=bias_rule, compiler_options=toy.COMPILER_OPTIONS)
    params = random_params()
    state = train_state_from_params(params, opt, jax.random.PRNGKey(0))
    batch = make_batch()
    losses, bias = [], params["text"]["moe_layers"]["moe"]["router"]["correction_bias"]
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        new_bias = np.asarray(state.params["text"]["moe_layers"]["moe"]["router"]["correction_bias"])
        load = np.asarray(metrics["moe_load_sum"])
        routed = (batch["segment_ids"] > 0).sum() * CONFIG.text.num_experts_per_tok
        assert load.shape == bias.shape and (load.sum(-1) == routed).all()   # every real token routed K times
        expected = bias + BIAS_RATE * np.sign(load.mean(-1, keepdims=True) - load)
        np.testing.assert_allclose(new_bias, expected, rtol=0, atol=1e-7)   # the rule alone moved it
        bias = new_bias
    assert losses[-1] < losses[0] - 0.3, losses
    assert float(metrics["seq_tokens"]) == (batch["segment_ids"] > 0).sum()
    end = jax.device_get(state.params)
    jax.tree.map(np.testing.assert_array_equal, end["vision"], params["vision"])
    router = end["text"]["moe_layers"]["moe"]["router"]["kernel"]
    assert np.abs(router - params["text"]["moe_layers"]["moe"]["router"]["kernel"]).max() > 1e-4

    # The trained params export to an HF checkpoint that reads back identically.
    export_hf(CONFIG, state.params, tmp_path / "hf")
    config, loaded = load_pretrained(tmp_path / "hf")
    assert config.text == CONFIG.text and config.vision == CONFIG.vision
    jax.tree.map(np.testing.assert_array_equal, loaded, end)
