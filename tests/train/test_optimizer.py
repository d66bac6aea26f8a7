"""Optimizer: config validation, labels, weight-decay mask, schedule, AdamW numbers against a hand computation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from glmv_jax.train.optimizer import build_optimizer, decay_mask, param_labels
from tests.train import toy


def test_labels_freeze_and_fixed():
    labels = param_labels(toy.init_params(), freeze=["vision"])
    assert labels["vision"]["proj"]["kernel"] == "frozen" and labels["vision"]["norm"]["scale"] == "frozen"
    assert labels["text"]["moe"]["router"]["correction_bias"] == "fixed"
    assert labels["text"]["moe"]["router"]["kernel"] == "train"
    assert labels["lm_head"]["kernel"] == "train"
    # A prefix matches whole path components only: "text/layers/mlp" freezes the mlp, not "text/layers/mlp_norm".
    labels = param_labels(toy.init_params(), freeze=["text/layers/mlp"])
    assert labels["text"]["layers"]["mlp"]["up"]["kernel"] == "frozen"
    assert labels["text"]["layers"]["mlp_norm"]["scale"] == "train"


def test_decay_mask_kernels_and_embeddings_only():
    mask = decay_mask(toy.init_params())
    assert mask["text"]["embed"]["embedding"] and mask["lm_head"]["kernel"] and mask["text"]["layers"]["mlp"]["up"]["kernel"]
    assert not mask["text"]["layers"]["mlp_norm"]["scale"]          # stacked norm: 2-D but a scale
    assert not mask["vision"]["norm"]["scale"] and not mask["text"]["moe"]["router"]["correction_bias"]


def test_schedule_warmup_cosine_final_fraction():
    opt = build_optimizer(ml_collections.ConfigDict(dict(lr=1.0, warmup_steps=10, total_steps=110,
                                                         final_lr_fraction=0.1)))
    lr = [float(opt.schedule(i)) for i in (0, 5, 10, 60, 110, 500)]
    np.testing.assert_allclose(lr, [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1, 0.1], rtol=1e-6, atol=1e-7)


def test_adamw_matches_hand_computation_with_clipping():
    """One update on {w: 2-D kernel, b: bias}; clip to norm 1, Adam step 1, decoupled decay on w only."""
    cfg = dict(lr=0.1, warmup_steps=0, total_steps=100, final_lr_fraction=1.0, b1=0.9, b2=0.99, eps=1e-8,
               weight_decay=0.5, clip_norm=1.0)
    opt = build_optimizer(cfg)
    params = {"w": {"kernel": jnp.full((2, 2), 2.0)}, "b": {"bias": jnp.full((2,), 3.0)}}
    grads = {"w": {"kernel": jnp.full((2, 2), 3.0)}, "b": {"bias": jnp.full((2,), 4.0)}}
    updates, _ = jax.jit(opt.tx.update)(grads, opt.tx.init(params), params)
    norm = np.sqrt(4 * 9 + 2 * 16)
    for g, p, decay, got in ((3.0, 2.0, True, updates["w"]["kernel"]), (4.0, 3.0, False, updates["b"]["bias"])):
        g = g / norm                                          # clipped
        m_hat, v_hat = g, g * g                              # bias-corrected first step
        expected = -0.1 * (m_hat / (np.sqrt(v_hat) + 1e-8) + (0.5 * p if decay else 0.0))
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(lr=0.0), "lr must be > 0"),
    (dict(lr=1e-3, total_steps=0), "total_steps"),
    (dict(lr=1e-3, warmup_steps=20, total_steps=10), "warmup_steps"),
    (dict(lr=1e-3, final_lr_fraction=1.5), "final_lr_fraction"),
    (dict(lr=1e-3, b2=1.0), "b2"),
    (dict(lr=1e-3, eps=0.0), "eps"),
    (dict(lr=1e-3, weight_decay=-1.0), "weight_decay"),
    (dict(lr=1e-3, clip_norm=-1.0), "clip_norm"),
    (dict(lr=1e-3, freeze="vision"), "freeze"),
    (dict(lr=1e-3, learning_rate=1.0), "unknown keys"),
])
def test_bad_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer({"total_steps": 10, **bad})


def test_unknown_freeze_prefix_raises_at_init():
    opt = build_optimizer(dict(lr=1e-3, total_steps=10, freeze=["visoin"]))
    with pytest.raises(ValueError, match="visoin.*match no parameter"):
        opt.tx.init(toy.init_params())


def test_frozen_and_fixed_have_no_moments():
    opt = build_optimizer(dict(toy.OPT_CFG, freeze=["vision"]))
    state = opt.tx.init(toy.init_params())
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    n_params = sum(x.size for x in jax.tree.leaves(toy.init_params()))
    n_frozen = toy.F * toy.D + toy.D + toy.E
    assert sum(x.size for x in jax.tree.leaves(adam.mu)) == n_params - n_frozen
