"""Compaction (generate(..., compact_every=S)): decoding in segments with finished rows dropped between them
gives the one loop's outputs exactly, greedy and sampled, with and without forced answering, on rows that end
at very different lengths; and per-row sampling keys (a row's draws do not depend on its batch slot)."""

import jax
import numpy as np
import pytest

from glmv_jax.config import tiny
from glmv_jax.generate import sampler
from glmv_jax.rl import rollout
from tests.helpers import SPANS, prompt_of, random_params, skewed_stop_ids
from tests.hf_oracle import multimodal_inputs

N, SAMPLES = 16, 4
KEYS = ("tokens", "logprobs", "lengths", "finished", "truncated", "forced", "forced_mask", "response_mask")


@pytest.fixture(scope="module")
def config():
    return tiny()


@pytest.fixture(scope="module")
def params(config):
    return random_params(config, seed=3, std=0.2)


@pytest.fixture(scope="module")
def prompts(config):
    """image, video and text prompts (12 rows with SAMPLES each: not a power of two)."""
    return [prompt_of(config, multimodal_inputs(config, SPANS[name], seed=i, text_len=2 + 3 * i))
            for i, name in enumerate(SPANS)]


@pytest.fixture
def gathers(monkeypatch):
    """(step, batch size) of each compaction, in order."""
    seen, gather = [], sampler._gather
    monkeypatch.setattr(sampler, "_gather",
                        lambda state, slots: seen.append((int(state["j"]), len(slots))) or gather(state, slots))
    return seen


def test_compacted_slots():
    t, f = True, False
    assert sampler.compacted_slots(np.array([t, f, t, t, f, t])).tolist() == [1, 4]
    assert sampler.compacted_slots(np.array([f, t, t, f, t, t, t, f])).tolist() == [0, 3, 7, 1]   # 3 -> 4 rows
    assert sampler.compacted_slots(np.array([f, f, f, t, t, t, t, t])).tolist() == [0, 1, 2, 3]
    assert sampler.compacted_slots(np.array([f, f, f, t, t])) is None          # fewer than half finished
    assert sampler.compacted_slots(np.array([t, f, f, t])).tolist() == [1, 2]
    assert sampler.compacted_slots(np.array([t, t, t])).tolist() == [0]


@pytest.mark.parametrize("temperature, budget", [(0.0, None), (0.0, 3), (1.0, None), (1.0, 3)])
def test_compacted_equals_one_loop(config, params, prompts, gathers, temperature, budget):
    """8 of 12 rows end early on stop ids only they emit (sampling: top_p filtered); the first compaction
    comes after step 4, in the middle of forcing the two answer ids (steps 3 and 4) in the forced case."""
    kw = dict(num_samples=SAMPLES, max_new_tokens=N, temperature=temperature, top_p=0.95 if temperature else 1.0,
              rng=jax.random.key(1), thinking_budget=budget, force_answer_ids=(5, 6) if budget else None)
    free = sampler.generate(config, params, prompts, **kw)
    short = np.arange(len(free["lengths"])) < 2 * SAMPLES
    kw["stop_ids"] = skewed_stop_ids(free["tokens"], short, start=1)
    ref = sampler.generate(config, params, prompts, **kw)
    assert ref["finished"][short].all() and not ref["finished"][~short].any()
    assert (ref["lengths"][short] <= 8).all() and (ref["lengths"] <= 4).sum() >= 6
    assert (ref["lengths"][~short] == N).all()
    if budget:
        assert ref["forced"][~short].all()
    out = sampler.generate(config, params, prompts, compact_every=4, **kw)
    assert gathers[0][0] == 4 and gathers[-1][1] == 4            # 12 rows -> 8 or 4 after step 4, then 4
    for key in KEYS:
        np.testing.assert_array_equal(out[key], ref[key], err_msg=key)
    np.testing.assert_array_equal(ref["tokens"][~short], free["tokens"][~short])     # the long rows as before
    if temperature and budget:
        traj = rollout.rollout(config, params, prompts, compact_every=4, **kw)
        np.testing.assert_array_equal(traj.tokens, ref["tokens"])
        np.testing.assert_array_equal(traj.logprobs, ref["logprobs"])


def test_sampling_keys_follow_the_row_not_the_slot(config, params, prompts):
    """A row's draws are those of fold_in(fold_in(rng, row), step): rows of one prompt differ, and the first
    rows of a batch draw what they draw in a batch with more rows."""
    kw = dict(max_new_tokens=4, temperature=1.0, rng=jax.random.key(2))
    big = sampler.generate(config, params, prompts[:1], num_samples=8, **kw)
    small = sampler.generate(config, params, prompts[:1], num_samples=2, **kw)
    assert len({tuple(t) for t in big["tokens"]}) > 1
    np.testing.assert_array_equal(small["tokens"], big["tokens"][:2])
    keys = sampler.step_keys(jax.random.key(2), np.array([0, 5]), 3)
    ref = jax.random.fold_in(jax.random.fold_in(jax.random.key(2), 5), 3)
    assert (jax.random.key_data(keys[1]) == jax.random.key_data(ref)).all()


def test_bad_compact_every_raises(config, params, prompts):
    with pytest.raises(ValueError, match="compact_every"):
        sampler.generate(config, params, prompts, max_new_tokens=2, compact_every=-1)
