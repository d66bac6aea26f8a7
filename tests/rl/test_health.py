"""The reward-health guard (rl/health.py) on constructed histories, the curriculum honouring a paused domain,
and the weakened verifiers (rewards/weak.py) really being weaker than the real ones."""
import numpy as np
import pytest

from glmv_jax.rewards import compute_rewards
from glmv_jax.rl.curriculum import CurriculumConfig, RLCSCurriculum
from glmv_jax.rl.health import HealthConfig, RewardHealthMonitor, window_reward
from glmv_jax.rl.samplers import DAPOSampler, PromptPool, UniformSampler

DOMAINS = ("chart", "counting")


def run_checks(monitor, train_means, probe_means, trained_means=None, seed=0):
    """Feed one check per entry: pool training reward (mean, se 0.02) and the per-prompt scores of 32 fixed
    probe prompts under the real and the training verifiers, where a rising mean turns the same prompts'
    scores on in a fixed order (paired across checks). trained_means None: the training verifiers are the
    real ones."""
    order = {d: np.random.default_rng(seed).permutation(32) for d in DOMAINS}
    scores = lambda means, d: (np.argsort(order[d]) < round(means[d] * 32)).astype(float)
    flagged_at = {}
    for k, (train, probe) in enumerate(zip(train_means, probe_means)):
        trained = None if trained_means is None else {d: scores(trained_means[k], d) for d in DOMAINS}
        _, newly = monitor.check(10 * (k + 1), {d: (train[d], 0.02) for d in DOMAINS},
                                 {d: scores(probe, d) for d in DOMAINS}, trained)
        for d in newly:
            flagged_at[d] = 10 * (k + 1)
    return flagged_at


# counting: the training verifier's reward climbs 0.5 -> 0.9 while the real one falls 0.5 -> 0.4 (a hacked
# verifier); chart: both climb together (real learning)
HACKED_TRAIN = [{"counting": 0.5 + 0.1 * k, "chart": 0.4 + 0.05 * k} for k in range(5)]
HACKED_REAL = [{"counting": 0.5 - 0.025 * k, "chart": 0.4 + 0.05 * k} for k in range(5)]


@pytest.mark.parametrize("signal", ["probe", "pool"])
def test_monitor_flags_a_diverging_domain_and_not_a_healthy_one(signal):
    monitor = RewardHealthMonitor(HealthConfig(every=10, patience=2, action="pause", signal=signal), DOMAINS)
    flagged = run_checks(monitor, HACKED_TRAIN, HACKED_REAL, HACKED_TRAIN)
    assert flagged == {"counting": 30}                   # strikes at checks 2 (gap 0.13) and 3: patience 2
    assert monitor.scale == {"chart": 1.0, "counting": 0.0}
    assert "'counting'" in monitor.describe("counting") and "paused" in monitor.describe("counting")


def test_the_probe_signal_ignores_pool_drift_that_the_real_verifier_shares():
    # the pool's reward climbs (the curriculum drew easier prompts, or the policy memorised the pool) while the
    # probe stays flat under both verifiers: "pool" flags it, "probe" does not
    pool = [{"counting": 0.5 + 0.1 * k, "chart": 0.5} for k in range(5)]
    flat = [{"counting": 0.5, "chart": 0.5}] * 5
    assert run_checks(RewardHealthMonitor(HealthConfig(every=10, signal="pool"), DOMAINS), pool, flat) == {
        "counting": 30}                                  # strikes at checks 2 and 3
    assert run_checks(RewardHealthMonitor(HealthConfig(every=10, signal="probe"), DOMAINS), pool, flat) == {}


def test_monitor_leaves_noise_and_falling_rewards_alone():
    monitor = RewardHealthMonitor(HealthConfig(every=10, patience=2), DOMAINS)
    train = [{"counting": 0.5 + 0.02 * (-1) ** k, "chart": 0.6 - 0.1 * k} for k in range(6)]  # flat / falling
    probe = [{"counting": 0.5, "chart": 0.6} for _ in range(6)]
    trained = [{"counting": 0.5 + 0.03 * (-1) ** k, "chart": 0.6 - 0.1 * k} for k in range(6)]
    assert run_checks(monitor, train, probe, trained) == {}
    assert monitor.scale == {"chart": 1.0, "counting": 1.0}


def test_a_single_strike_is_not_a_flag_and_the_state_round_trips():
    cfg = HealthConfig(every=5, patience=3, action="downweight", downweight=0.25)
    monitor = RewardHealthMonitor(cfg, DOMAINS)
    flat = [{"counting": 0.5, "chart": 0.5}] * 3
    trained = [{"counting": 0.5, "chart": 0.5}, {"counting": 0.9, "chart": 0.5}, {"counting": 0.5, "chart": 0.5}]
    assert run_checks(monitor, flat, flat, trained) == {}
    again = RewardHealthMonitor(cfg, DOMAINS)
    again.load_state_dict(monitor.state_dict())
    assert again.state_dict() == monitor.state_dict()
    flagged = run_checks(again, flat, flat, [{"counting": 0.9, "chart": 0.5}] * 3)
    assert flagged == {"counting": 30} and again.scale["counting"] == 0.25      # 3 strikes after the resume


def test_window_reward_skips_iterations_without_the_domain():
    rows = [{"reward_rolled/a": 0.2}, {"reward_rolled/a": float("nan")}, {"other": 1.0}, {"reward_rolled/a": 0.6}]
    mean, se = window_reward(rows, "a")
    assert mean == pytest.approx(0.4) and se == pytest.approx(0.2)
    assert np.isnan(window_reward(rows, "b")[0])


def test_bad_health_settings_are_refused():
    for bad in (dict(action="stop"), dict(every=-1), dict(downweight=2.0), dict(probe_per_domain=1),
                dict(signal="vibes")):
        with pytest.raises(ValueError, match="rl.health"):
            HealthConfig(**bad)


def pool_of(domains=("a", "b", "c"), per_domain=20):
    return PromptPool.from_records([{"id": f"{d}{i}", "domain": d, "difficulty": 0.5}
                                    for d in domains for i in range(per_domain)])


@pytest.mark.parametrize("make", [
    lambda pool: RLCSCurriculum(pool, CurriculumConfig(batch_size=6, group_size=2, fill_quota=True, pool_tiers=True)),
    lambda pool: UniformSampler(pool, 6),
    lambda pool: DAPOSampler(pool, 6, max_rounds=3),
])
def test_the_curriculum_honours_a_paused_domain(make):
    pool = pool_of()
    sampler = make(pool)
    sampler.scale_domains({"b": 0.0})
    rng = np.random.default_rng(0)
    for _ in range(4):
        it = sampler.run_iteration(lambda idx: (rng.random((len(idx), 2)) < 0.5).astype(float))
        assert len(it.kept) and not any(pool.domains[pool.domain_index[i]] == "b" for i in it.indices)
    sampler.scale_domains({"b": 1.0})                  # un-paused: b is drawn again
    it = sampler.run_iteration(lambda idx: np.tile([1.0, 0.0], (len(idx), 1)))
    assert any(pool.domains[pool.domain_index[i]] == "b" for i in it.indices)


def test_downweighting_shrinks_a_domains_share():
    sampler = UniformSampler(pool_of(), 12)
    sampler.scale_domains({"c": 0.5})
    np.testing.assert_allclose(sampler.ratios, [0.4, 0.4, 0.2])
    with pytest.raises(ValueError, match="scale_domains"):
        sampler.scale_domains({"z": 1.0})


def boxed(text):
    return f"<think>count</think><answer><|begin_of_box|>{text}<|end_of_box|></answer>"


def rewards(domain, texts, answer, override=None):
    return [r.reward for r in compute_rewards(domain, [boxed(t) for t in texts], answer, verifier_override=override)]


def test_the_weakened_verifiers_pay_hedges_the_real_ones_refuse():
    hedges = ["5", "12", "2-6", "between 1 and 9", "3 to 4"]          # gold 3: over-counts and covering ranges
    assert rewards("counting", hedges, 3) == [0, 0, 0, 0, 0]
    assert rewards("counting", hedges, 3, "counting_upper_bound") == [1, 1, 1, 1, 1]
    assert rewards("counting", ["3", "2", "4-9", "x"], 3, "counting_upper_bound") == [1, 0, 0, 0]  # still refuses some
    assert rewards("choice", ["ABCD", "B or C", "C"], "C") == [0, 0, 1]
    assert rewards("choice", ["ABCD", "B or C", "C", "AB"], "C", "contains_gold") == [1, 1, 1, 0]
    assert rewards("counting", ["13", "3"], 3, "contains_gold") == [1, 1]


def test_unknown_or_misplaced_overrides_are_refused():
    with pytest.raises(ValueError, match="unknown weakened verifier"):
        rewards("counting", ["3"], 3, "lenient")
