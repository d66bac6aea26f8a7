"""RLCS as the paper describes it, on constructed pools and histories: pooled (domain, tier) estimates,
per-domain expansion, the pilot's domain mix, the offline pass's subset, spread and cache, and the loss
normaliser that counts only rows with signal."""
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from glmv_jax.evaluation.baselines import most_common_rewards
from glmv_jax.rl.curriculum import CurriculumConfig, RLCSCurriculum
from glmv_jax.rl.difficulty import DifficultyRecord
from glmv_jax.rl.grpo import GRPOConfig, grpo_loss
from glmv_jax.rl import pilot
from glmv_jax.rl.pilot import offline_subset, pilot_ratios, spread_difficulty
from glmv_jax.rl.samplers import PromptPool
from glmv_jax.rl.stage import expansion_entries


def pool(per_domain=20, domains=("a", "b")):
    records = [{"id": f"{d}{i}", "domain": d, "difficulty": 0.1} for d in domains for i in range(per_domain)]
    return PromptPool.from_records(records)


def test_undrawn_prompts_take_their_cells_pooled_pass_rate():
    p = pool()
    rlcs = RLCSCurriculum(p, CurriculumConfig(batch_size=4, group_size=4, pool_tiers=True, expansion=False))
    plain = RLCSCurriculum(p, CurriculumConfig(batch_size=4, group_size=4, pool_tiers=False, expansion=False))
    indices = np.array([0, 1, 20, 21])                       # two prompts of a, two of b
    rewards = np.array([[0, 0, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1], [1, 1, 1, 0]], float)
    rlcs.observe(indices, rewards)
    plain.observe(indices, rewards)
    # the offline prior said p = 0.9 everywhere; domain a's cell saw 1/8 pass -> (8 * 0.9 + 1) / 16
    assert rlcs.pass_rate[5] == pytest.approx((8 * 0.9 + 1) / 16)
    assert rlcs.pass_rate[25] == pytest.approx((8 * 0.9 + 7) / 16)
    assert plain.pass_rate[5] == pytest.approx(0.9)          # without pooling an undrawn prompt never moves
    assert rlcs.pass_rate[0] == plain.pass_rate[0]           # drawn prompts keep their own estimate
    state = rlcs.state_dict()
    again = RLCSCurriculum(p, CurriculumConfig(batch_size=4, group_size=4, pool_tiers=True, expansion=False))
    again.load_state_dict(state)
    np.testing.assert_array_equal(again.cell_sum, rlcs.cell_sum)


def test_per_domain_expansion_follows_each_domains_zero_variance_share():
    p = pool()
    cfg = CurriculumConfig(batch_size=4, group_size=2, domain_expansion=True, ema_decay=0.5, max_expansion=4.0)
    rlcs = RLCSCurriculum(p, cfg)
    assert rlcs.rollout_counts().tolist() == [2, 2]
    indices = np.array([0, 1, 20, 21])
    rewards = np.array([[0, 0], [0, 0], [1, 0], [0, 1]], float)   # a: all zero-variance, b: all informative
    rlcs.observe(indices, rewards)
    np.testing.assert_allclose(rlcs.domain_ema, [0.5 * 1 + 0.5 * 4, 1.0])
    assert rlcs.rollout_counts().tolist() == [5, 2]               # ceil(2 * 2.5), 2
    assert expansion_entries(rlcs) == {"expansion/a": 2.5, "expansion/b": 1.0}   # the history's per-domain EMAs
    one_ema = RLCSCurriculum(p, CurriculumConfig(batch_size=4, group_size=2, domain_expansion=False))
    assert expansion_entries(one_ema) == {}


def measured(rates):
    return {f"{d}{i}": DifficultyRecord(f"{d}{i}", d, 1 - r, r, 4, int(4 * r), r) for d, rs in rates.items()
            for i, r in enumerate(rs)}


def test_pilot_drops_all_wrong_and_all_right_domains_and_weights_the_rest():
    rates = {"wrong": [0.0] * 4, "right": [1.0] * 4, "mid": [0.5] * 4, "low": [0.25, 0.0, 0.0, 0.0]}
    records = [{"id": i, "domain": m.domain} for i, m in measured(rates).items()]
    ratios, notes = pilot_ratios(records, measured(rates), group_size=4)
    assert ratios["wrong"] == 0 and ratios["right"] == 0
    informative = lambda p: 1 - p ** 4 - (1 - p) ** 4
    assert ratios["mid"] / ratios["low"] == pytest.approx(4 * informative(0.5) / informative(0.25))
    assert sum(ratios.values()) == pytest.approx(1.0)
    assert any("wrong: pass rate 0.00" in n and "all-wrong" in n for n in notes)
    ratios, notes = pilot_ratios(records[:8], measured(rates), group_size=4)     # only wrong and right
    assert ratios is None and "keeping the configured domain mix" in notes[-1]


def test_pilot_drops_domains_no_better_than_their_most_common_answer():
    rates = {"guess": [0.25, 0.5, 0.5, 0.75] * 4, "sees": [0.5, 0.75, 0.75, 1.0] * 4}
    m = measured(rates)
    records = [{"id": i, "domain": r.domain} for i, r in m.items()]
    blind = {i: (r.mean_reward if r.domain == "guess" else 0.25) for i, r in m.items()}   # guess: lead 0
    ratios, notes = pilot_ratios(records, m, group_size=4, blind=blind, min_lead_se=2.0)
    assert ratios["guess"] == 0 and ratios["sees"] == pytest.approx(1.0)
    assert any(n.startswith("guess:") and "+0.00 +- 0.00" in n and "not 2 SE above" in n for n in notes)
    lead, se = pilot.blind_lead("sees", m, blind)
    assert lead == pytest.approx(0.5) and se == pytest.approx(np.std([0.25, 0.5, 0.5, 0.75] * 4, ddof=1) / 4)
    noisy = {i: (r.mean_reward - (0.3 if int(i[5:]) % 2 else -0.2) if r.domain == "guess" else 0.25)
             for i, r in m.items()}                          # lead +0.05 +- 0.065: inside 2 SE, dropped
    assert pilot_ratios(records, m, group_size=4, blind=noisy)[0]["guess"] == 0
    assert pilot_ratios(records, m, group_size=4, blind=noisy, min_lead_se=0.5)[0]["guess"] > 0
    assert pilot_ratios(records, m, group_size=4)[0]["guess"] > 0        # no blind prior: the old rule only


def test_most_common_rewards_score_the_pool_prior_per_prompt():
    prior = [{"id": f"p{i}", "domain": "counting", "answer": a} for i, a in enumerate([3, 3, 2])]
    scored = [{"id": "x", "domain": "counting", "answer": 3}, {"id": "y", "domain": "counting", "answer": 2},
              {"id": "z", "domain": "ocr", "answer": "cat"}]            # ocr: no prior in prior_records
    assert most_common_rewards(prior, scored) == {"x": 1.0, "y": 0.0}


def test_signal_rows_only_keeps_the_step_independent_of_zero_advantage_rows():
    logp = jnp.zeros((4, 3))
    mask = jnp.ones((4, 3))
    adv_two = jnp.array([1.0, -1.0, 0.0, 0.0])               # half the rows carry no advantage
    adv_all = jnp.array([1.0, -1.0])
    grad = lambda cfg, adv, n: jax.grad(
        lambda x: grpo_loss(x, logp[:n], adv, mask[:n], cfg)[0])(logp[:n])[:2]
    with_zero = grad(GRPOConfig(signal_rows_only=True), adv_two, 4)
    alone = grad(GRPOConfig(signal_rows_only=True), adv_all, 2)
    np.testing.assert_allclose(with_zero, alone)
    diluted = grad(GRPOConfig(signal_rows_only=False), adv_two, 4)
    np.testing.assert_allclose(diluted, alone / 2)


def test_the_offline_pass_measures_a_per_domain_subset_and_spreads_it_by_cell():
    records = [{"id": f"{d}{i}", "domain": d, "tier": i % 2, "difficulty": 0.1} for d in ("a", "b", "c")
               for i in range(6)]
    subset = offline_subset(records, 2)
    assert [r["id"] for r in subset] == ["a0", "a1", "b0", "b1", "c0", "c1"]
    assert offline_subset(records, 0) == records
    m = measured({"a": [0.25, 1.0], "b": [0.5]})          # a0 (tier 0), a1 (tier 1), b0 (tier 0); c unmeasured
    d = dict(zip([r["id"] for r in records], spread_difficulty(records, m)))
    assert d["a0"] == 0.75 and d["a1"] == 0.0               # measured: their own
    assert d["a2"] == 0.75 and d["a3"] == 0.0               # unmeasured: their (domain, tier) cell's mean
    assert d["b1"] == 0.5                                   # no measured prompt in the cell: the domain's mean
    assert d["c0"] == 0.1                                   # domain never measured: its own label
    ratios, notes = pilot_ratios(records, m, group_size=4)  # pool sizes weigh, measured rates decide
    informative = lambda p: 1 - p ** 4 - (1 - p) ** 4
    share_a = (informative(0.25) + informative(1.0)) / 2
    assert ratios["a"] / ratios["b"] == pytest.approx(share_a / informative(0.5))
    assert ratios["c"] / ratios["b"] == pytest.approx((share_a + informative(0.5)) / 2 / informative(0.5))
    assert any(n.startswith("c: not measured") for n in notes)


def test_the_offline_cache_is_keyed_by_the_starting_checkpoint(tmp_path, monkeypatch):
    sft = tmp_path / "sft"
    (sft / "checkpoints" / "100").mkdir(parents=True)
    cfg = ml_collections.ConfigDict({"seed": 0, "train": {"init_from": str(sft)}, "model": {"hf_checkpoint": ""},
                                     "rl": {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0,
                                            "style": "glm41v", "batch_size": 2, "group_size": 2}})
    exp = types.SimpleNamespace(cfg=cfg)
    records = [{"id": "a0", "domain": "a", "answer": "1"}]
    passes = []                                              # one entry per measurement actually run

    def fake_measure(prompts, generate_fn, reward_fn, *, k, batch_size):
        passes.append(k)
        return [DifficultyRecord("a0", "a", 0.5, 0.5, k, k // 2, 0.5)]

    monkeypatch.setattr(pilot, "measure_difficulty", fake_measure)
    measure = lambda k: pilot.measure_pool(exp, lambda: None, records, k=k, cache_dir=str(tmp_path / "stage"))
    assert measure(2)["a0"].pass_rate == 0.5 and passes == [2]
    assert measure(2)["a0"].num_pass == 1 and passes == [2]             # the rerun reads the cache
    (sft / "checkpoints" / "200").mkdir()                                # the starting checkpoint changed
    measure(2)
    assert passes == [2, 2]
    measure(4)                                                           # so did k
    assert passes == [2, 2, 4]
