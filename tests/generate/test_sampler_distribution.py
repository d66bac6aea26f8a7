"""The sampler draws from the model's next-token distribution: the first sampled token of many rows (one
batched call) against softmax(full-forward logits / T) at the last prompt position, by a chi-square
goodness-of-fit test on a 32-token vocabulary. Every check also shows that the test rejects a wrong
sampler (greedy, temperature ignored, temperature applied twice, unfiltered when filtering was asked)."""

import dataclasses

import jax
import numpy as np
import pytest
from scipy import stats

from glmv_jax.config import tiny
from glmv_jax.models import glmv
from glmv_jax.generate import sampler
from tests.helpers import random_params

ROWS = 2000
ALPHA = 1e-4          # false-rejection rate of a correct sampler


@pytest.fixture(scope="module")
def config():
    base = tiny()
    return base.replace(text=dataclasses.replace(base.text, vocab_size=32), image_token_id=26, video_token_id=27,
                        image_start_token_id=28, image_end_token_id=29, video_start_token_id=30,
                        video_end_token_id=31).validate()


@pytest.fixture(scope="module")
def params(config):
    """Random weights of std 0.2 (norm scales near 1): O(1) activations and logits with a spread of about 1.5
    (a distribution neither a flat nor a one-hot sampler fits)."""
    return random_params(config, seed=3, std=0.2)


@pytest.fixture(scope="module")
def inputs(config):
    """One image prompt (a 4x6-patch image = 6 image tokens between text) as the HF processor shapes it."""
    rng = np.random.default_rng(0)
    ids = [5, 9, 3, 28] + [26] * 6 + [29, 7, 11, 2, 4]
    types = [0, 0, 0, 0] + [1] * 6 + [0] * 5
    return dict(input_ids=np.array([ids]), mm_token_type_ids=np.array([types]),
                pixel_values=rng.standard_normal((24, config.vision.patch_dim)).astype(np.float32),
                image_grid_thw=np.array([[1, 4, 6]]))


@pytest.fixture(scope="module")
def prompt(config, inputs):
    batch, delta = glmv.prepare_inputs(config, **inputs)
    return dict(input_ids=batch["input_ids"][0], token_type=batch["token_type"][0],
                position_ids=batch["position_ids"][:, 0], rope_delta=int(delta[0]),
                pixel_values=batch["pixel_values"], patch_pos=batch["patch_pos"], patch_grid=batch["patch_grid"],
                patch_frame=batch["patch_segment"] - 1)


@pytest.fixture(scope="module")
def logits(config, params, inputs):
    """Full-forward logits [V] at the last prompt position (no KV cache)."""
    return np.asarray(glmv.forward(config, params, **inputs), np.float64)[0, -1]


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def first_tokens(config, params, prompt, seed, **kw):
    out = sampler.generate(config, params, [prompt], num_samples=ROWS, max_new_tokens=1, rng=jax.random.key(seed), **kw)
    return out["tokens"][:, 0], out["logprobs"][:, 0]


def chi_square(tokens, p):
    """(statistic, critical value at ALPHA) of the counts of `tokens` against probabilities p [V]; bins with
    an expected count below 5 are pooled; an observed token of probability 0 gives an infinite statistic."""
    counts = np.bincount(tokens, minlength=len(p)).astype(np.float64)
    expected = ROWS * p
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        if obs[-1] > 0:
            return np.inf, 0.0
        obs, exp = obs[:-1], exp[:-1]
    if len(exp) < 2:
        return 0.0, 0.0
    return float(((obs - exp) ** 2 / exp).sum()), float(stats.chi2.isf(ALPHA, len(exp) - 1))


def accepts(tokens, p) -> bool:
    stat, critical = chi_square(tokens, p)
    return stat <= critical


def point_mass(logits):
    return np.eye(len(logits))[np.argmax(logits)]


def test_the_distribution_is_neither_flat_nor_one_hot(logits):
    p = softmax(logits)
    assert 0.1 < p.max() < 0.6 and (p > 0.01).sum() >= 8


def test_temperature_one_matches_softmax(config, params, prompt, logits):
    tokens, logprobs = first_tokens(config, params, prompt, seed=0, temperature=1.0, top_p=1.0, top_k=0)
    p = softmax(logits)
    assert accepts(tokens, p)
    np.testing.assert_allclose(logprobs, np.log(p[tokens]), atol=1e-4)     # recorded log-prob of each draw
    assert not accepts(tokens, softmax(logits / 0.5))                          # a sharper distribution
    assert not accepts(tokens, point_mass(logits))                             # greedy
    assert not accepts(tokens, np.full(len(p), 1 / len(p)))                    # uniform
    greedy, _ = first_tokens(config, params, prompt, seed=0, temperature=0.0)
    assert (greedy == np.argmax(logits)).all() and not accepts(greedy, p)     # a greedy sampler fails the test


def test_temperature_half_matches_softmax_of_scaled_logits(config, params, prompt, logits):
    tokens, logprobs = first_tokens(config, params, prompt, seed=1, temperature=0.5, top_p=1.0, top_k=0)
    assert accepts(tokens, softmax(logits / 0.5))
    np.testing.assert_allclose(logprobs, np.log(softmax(logits / 0.5)[tokens]), atol=1e-4)
    assert not accepts(tokens, softmax(logits))                 # temperature ignored
    assert not accepts(tokens, softmax(logits / 0.25))          # temperature applied twice
    # and the test rejects an actual run at the wrong temperature
    wrong, _ = first_tokens(config, params, prompt, seed=1, temperature=1.0)
    assert not accepts(wrong, softmax(logits / 0.5))


def test_top_k_and_top_p_sample_the_renormalized_kept_set(config, params, prompt, logits):
    p = softmax(logits)
    order = np.argsort(-p)
    top5 = np.zeros_like(p)
    top5[order[:5]] = p[order[:5]]
    tokens, _ = first_tokens(config, params, prompt, seed=2, temperature=1.0, top_k=5)
    assert set(np.unique(tokens)) <= set(order[:5].tolist()) and accepts(tokens, top5 / top5.sum())
    assert not accepts(tokens, p)                                               # unfiltered
    # top_p: the smallest set of most likely tokens whose mass reaches top_p
    top_p = float(np.cumsum(p[order])[3] - 1e-3)                                 # 4 tokens reach it
    nucleus = np.zeros_like(p)
    nucleus[order[:4]] = p[order[:4]]
    tokens, _ = first_tokens(config, params, prompt, seed=3, temperature=1.0, top_p=top_p)
    assert set(np.unique(tokens)) <= set(order[:4].tolist()) and accepts(tokens, nucleus / nucleus.sum())
    assert not accepts(tokens, top5 / top5.sum())
