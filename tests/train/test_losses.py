"""Losses: masked CE and z-loss against a float64 numpy reference; chunked CE equals full CE (values, grads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmv_jax.train.losses import chunked_cross_entropy, cross_entropy, per_domain_sums

B, T, D, V = 2, 8, 6, 11


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    kernel = (3 * rng.normal(size=(D, V))).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = (rng.random((B, T)) < 0.6).astype(np.float32)
    return hidden, kernel, targets, mask


def reference(logits, targets, mask, z_loss=0.0):
    logits = logits.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return float(((ce + z_loss * lse ** 2) * mask).sum()), float(mask.sum()), ce


def test_cross_entropy_matches_reference(data):
    hidden, kernel, targets, mask = data
    logits = hidden @ kernel
    for z in (0.0, 1e-2):
        loss_sum, count, extras = cross_entropy(jnp.asarray(logits), targets, mask, z_loss=z)
        ref_sum, ref_count, ref_ce = reference(logits, targets, mask, z)
        np.testing.assert_allclose(float(loss_sum), ref_sum, rtol=1e-6)
        assert float(count) == ref_count
        np.testing.assert_allclose(np.asarray(extras["token_loss"]), ref_ce, rtol=1e-5, atol=1e-6)
        assert extras["token_loss"].dtype == jnp.float32


def test_bf16_logits_reduced_in_fp32(data):
    hidden, kernel, targets, mask = data
    logits = jnp.asarray(hidden @ kernel).astype(jnp.bfloat16)
    loss_sum, _, extras = cross_entropy(logits, targets, mask)
    ref_sum, _, _ = reference(np.asarray(logits.astype(jnp.float32)), targets, mask)
    assert loss_sum.dtype == jnp.float32
    np.testing.assert_allclose(float(loss_sum), ref_sum, rtol=1e-6)


def test_chunked_equals_full_values_and_grads(data):
    hidden, kernel, targets, mask = data

    def full(h, k):
        return cross_entropy(h @ k, targets, mask, z_loss=1e-3)[0]

    def chunked(h, k):
        return chunked_cross_entropy(h, k, targets, mask, chunk_size=4, z_loss=1e-3)[0]

    (v_full, g_full), (v_chunk, g_chunk) = [jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hidden, kernel)
                                            for f in (full, chunked)]
    np.testing.assert_allclose(float(v_chunk), float(v_full), rtol=1e-6)
    for a, b in zip(g_chunk, g_full):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_per_domain_sums(data):
    hidden, kernel, targets, mask = data
    _, _, extras = cross_entropy(hidden @ kernel, targets, mask)
    sums, counts = per_domain_sums(extras["token_loss"], mask, jnp.array([2, 0]), num_domains=3)
    token_loss = np.asarray(extras["token_loss"])
    np.testing.assert_allclose(np.asarray(sums), [(token_loss[1] * mask[1]).sum(), 0.0,
                                                  (token_loss[0] * mask[0]).sum()], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(counts), [mask[1].sum(), 0.0, mask[0].sum()])


def test_bad_shapes_raise(data):
    hidden, kernel, targets, mask = data
    with pytest.raises(ValueError, match="same shape"):
        cross_entropy(hidden @ kernel, targets, mask[:, :4])
    with pytest.raises(ValueError, match="do not match targets"):
        cross_entropy((hidden @ kernel)[:, :4], targets, mask)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden, kernel, targets, mask, chunk_size=3)
    with pytest.raises(ValueError, match="hidden width"):
        chunked_cross_entropy(hidden, kernel[:4], targets, mask, chunk_size=4)
