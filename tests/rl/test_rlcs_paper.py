"""RLCS as the paper describes it, on constructed pools and histories: pooled (domain, tier) estimates,
per-domain expansion, the pilot's domain mix, and the loss normaliser that counts only rows with signal."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmv_jax.rl.curriculum import CurriculumConfig, RLCSCurriculum
from glmv_jax.rl.difficulty import DifficultyRecord
from glmv_jax.rl.grpo import GRPOConfig, grpo_loss
from glmv_jax.rl.pilot import pilot_ratios
from glmv_jax.rl.samplers import PromptPool


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
