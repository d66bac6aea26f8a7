"""RLCS group selection and ratio-EMA expansion on constructed rollout histories, against brute force and
hand-computed numbers (test_curriculum.py covers the sampler's behaviour on simulated populations; here:
exactly which groups are kept, per domain, for both select_by rules, and three iterations of expansion)."""

import math

import numpy as np
import pytest

from glmv_jax.rl.curriculum import CurriculumConfig, RLCSCurriculum
from glmv_jax.rl.samplers import PromptPool, allocate

G = 8


def pool_of(domains: dict[str, int]) -> PromptPool:
    return PromptPool.from_records([{"id": f"{d}{i}", "domain": d, "difficulty": 0.5}
                                    for d, n in domains.items() for i in range(n)])


def brute_force_best(score: np.ndarray, b: int) -> set[int]:
    """The b positions of highest score; requires no tie across the cut."""
    order = np.argsort(-score, kind="stable")
    assert score[order[b - 1]] > score[order[b]], "constructed case has a tie at the cut"
    return set(order[:b].tolist())


# Continuous rewards where the two rules disagree (mean, variance):
GROUPS = np.array([[0.5] * 8,                      # a: 0.5,   0       (balanced but uninformative)
                   [0, 1] * 4,                     # b: 0.5,   0.25
                   [0.2, 0.8] * 4,                 # c: 0.5,   0.09
                   [1, 1, 1, 1, 1, 1, 0, 0],       # d: 0.75,  0.1875
                   [0, 0, 0, 0, 0, 0, 0, 1],       # e: 0.125, 0.109
                   [0.9] * 8,                      # f: 0.9,   0
                   [0, 0, 0, 0, 0, 0, 0, 0.6],     # g: 0.075, 0.0394
                   [0.3, 0.4] * 4], float)         # h: 0.35,  0.0025


@pytest.mark.parametrize("select_by", ["balance", "variance"])
def test_kept_groups_are_exactly_the_best_by_the_rule(select_by):
    rlcs = RLCSCurriculum(pool_of({"m": 20}), CurriculumConfig(batch_size=3, group_size=G, select_by=select_by))
    indices = np.array([2, 5, 7, 8, 11, 13, 17, 19])
    kept = rlcs.select(indices, GROUPS)
    mean, var = GROUPS.mean(axis=1), GROUPS.var(axis=1)
    score = -np.abs(mean - 0.5) if select_by == "balance" else var
    if select_by == "balance":                      # three groups at exactly 1/2 (a, b, c)
        assert set(kept.tolist()) == {0, 1, 2}
    else:
        assert set(kept.tolist()) == brute_force_best(score, 3) == {1, 3, 4}     # b, d, e
    for b in (1, 2, 4, 5, 6):                       # every cut without a tie
        order = np.sort(score)[::-1]
        if order[b - 1] > order[b]:
            cfg = CurriculumConfig(batch_size=b, group_size=G, select_by=select_by)
            assert set(RLCSCurriculum(pool_of({"m": 20}), cfg).select(indices, GROUPS).tolist()) == \
                brute_force_best(score, b)


def test_ties_at_the_cut_keep_the_better_groups_and_one_of_the_tied():
    # pass counts out of 8: distances from 1/2 are 0, 0, 1/8, 1/8, 1/4, 1/4, 1/4, 3/8, 1/2
    passes = np.array([4, 4, 3, 5, 2, 6, 6, 1, 8])
    rewards = (np.arange(G)[None, :] < passes[:, None]).astype(float)
    cfg = CurriculumConfig(batch_size=5, group_size=G, select_by="balance", seed=3)
    rlcs = RLCSCurriculum(pool_of({"m": 30}), cfg)
    kept = rlcs.select(np.arange(9), rewards)
    assert len(kept) == 5 and {0, 1, 2, 3} < set(kept.tolist())
    assert len(set(kept.tolist()) & {4, 5, 6}) == 1                       # one of the three at 1/4
    np.testing.assert_array_equal(rlcs.select(np.arange(9), rewards), kept)   # deterministic given seed


def test_binary_rewards_variance_and_balance_keep_the_same_groups():
    """For 0/1 rewards var = p(1 - p), a decreasing function of |p - 1/2|: both rules, same tie-break."""
    rng = np.random.default_rng(0)
    pool = pool_of({"m": 50, "o": 30})
    for trial in range(5):
        indices = np.sort(rng.choice(80, size=24, replace=False))
        rewards = (rng.random((24, G)) < rng.random((24, 1))).astype(float)
        kept = [RLCSCurriculum(pool, CurriculumConfig(batch_size=10, group_size=G, select_by=rule, seed=trial))
                .select(indices, rewards) for rule in ("variance", "balance")]
        np.testing.assert_array_equal(kept[0], kept[1])


def test_each_domain_keeps_its_quota_of_its_own_best_groups():
    pool = pool_of({"m": 10, "o": 10})                       # indices 0-9 domain m, 10-19 domain o
    cfg = CurriculumConfig(batch_size=4, group_size=G, select_by="balance", domain_ratios={"m": 0.75, "o": 0.25})
    rlcs = RLCSCurriculum(pool, cfg)
    indices = np.array([0, 1, 2, 3, 4, 10, 11, 12])
    passes = np.array([0, 1, 8, 2, 7,                        # m: distances 1/2, 3/8, 1/2, 1/4, 3/8
                       4, 4, 3])                             # o: all closer to 1/2 than any m group
    rewards = (np.arange(G)[None, :] < passes[:, None]).astype(float)
    kept = rlcs.select(indices, rewards)
    # quota m = 3 (its best: positions 1, 3, 4), o = 1 (one of its two perfect groups)
    assert set(kept[kept < 5].tolist()) == {1, 3, 4}
    assert len(kept[kept >= 5]) == 1 and int(kept[kept >= 5][0]) in (5, 6)


def rollout_with_constant_groups(constant: int):
    """rollout_fn whose first `constant` groups have zero variance (all 0, all 1, a constant 0.3 and a
    constant 0.7 up to 1e-9 noise: below zero_var_eps) and the rest are informative."""
    def rollout(indices):
        n = len(indices)
        out = np.tile((np.arange(G) < 3).astype(float), (n, 1))             # informative: 3/8
        fills = [0.0, 1.0, 0.3, 0.7]
        for i in range(constant):
            out[i] = fills[i % 4] + (1e-9 * np.arange(G) if i % 4 == 3 else 0.0)
        return out
    return rollout


def test_expansion_ema_over_three_iterations_by_hand():
    cfg = CurriculumConfig(batch_size=8, group_size=G, ema_decay=0.7, initial_expansion=1.0, max_expansion=3.0)
    rlcs = RLCSCurriculum(pool_of({"m": 40}), cfg)
    # (rollout size, constant groups) -> r_t, 1 / (1 - r_t) (clamped at 3), EMA = 0.7 EMA + 0.3 ratio:
    #   it 1:  8 prompts,  2 constant: r = 1/4, ratio 4/3,           EMA 0.7 * 1.0  + 0.3 * 4/3 = 1.1
    #   it 2:  9 prompts,  6 constant: r = 2/3, ratio 3,             EMA 0.7 * 1.1  + 0.3 * 3   = 1.67
    #   it 3: 14 prompts, 12 constant: r = 6/7, ratio 7 -> 3 (clamp), EMA 0.7 * 1.67 + 0.3 * 3   = 2.069
    expected = [(8, 2, 0.25, 4 / 3, 1.1, 9), (9, 6, 2 / 3, 3.0, 1.67, 14), (14, 12, 6 / 7, 3.0, 2.069, 17)]
    for size, constant, r, ratio, ema, next_size in expected:
        it = rlcs.run_iteration(rollout_with_constant_groups(constant))
        m = it.metrics
        assert len(it.indices) == m["rollout_prompts"] == size
        assert m["zero_var_share"] == pytest.approx(r) and m["expansion_ratio"] == pytest.approx(ratio)
        assert m["expansion_ema"] == pytest.approx(ema) and rlcs.expansion_ema == pytest.approx(ema)
        assert m["next_rollout_prompts"] == next_size == math.ceil(8 * ema)
        assert len(it.kept) == 8
        informative = set(range(constant, size))
        assert informative <= set(it.kept.tolist())                        # variance rule: informative first
        assert m["kept_informative_share"] == pytest.approx(len(informative) / 8 if len(informative) < 8 else 1.0)


def test_no_expansion_keeps_the_rollout_at_the_batch_size():
    cfg = CurriculumConfig(batch_size=8, group_size=G, expansion=False, initial_expansion=1.0)
    rlcs = RLCSCurriculum(pool_of({"m": 40}), cfg)
    for constant in (2, 6, 7):
        it = rlcs.run_iteration(rollout_with_constant_groups(constant))
        assert len(it.indices) == 8 and it.metrics["expansion_ema"] == 1.0
        assert it.metrics["expansion_ratio"] == pytest.approx(min(8 / (8 - constant), 4.0))   # max_expansion 4


def binary_groups(passes) -> np.ndarray:
    """[n, G] 0/1 rewards with passes[i] ones in row i."""
    return (np.arange(G)[None, :] < np.asarray(passes)[:, None]).astype(float)


def test_fill_quota_gives_unused_quota_to_other_domains_best_informative_groups():
    pool = pool_of({"m": 10, "o": 10, "p": 10})               # indices 0-9 m, 10-19 o, 20-29 p
    ratios = {"m": 0.5, "o": 0.25, "p": 0.25}
    indices = np.array([0, 1, 2, 3, 10, 11, 12, 13, 14, 20, 21, 22])
    passes = np.array([8, 0, 3, 8,                            # m: one informative group (pos 2), three constant
                       4, 3, 2, 1, 0,                         # o: pos 4 (1/2) > 5 (3/8) > 6 (1/4) > 7 (1/8)
                       5, 8, 0])                              # p: pos 9 (5/8), two constant
    rewards = binary_groups(passes)
    for rule in ("variance", "balance"):
        plain = RLCSCurriculum(pool, CurriculumConfig(batch_size=8, group_size=G, select_by=rule,
                                                      domain_ratios=ratios)).select(indices, rewards)
        filled = RLCSCurriculum(pool, CurriculumConfig(batch_size=8, group_size=G, select_by=rule, domain_ratios=ratios,
                                                       fill_quota=True)).select(indices, rewards)
        # quotas m 4, o 2, p 2: without filling m keeps its 3 constant groups and p one
        assert len(plain) == 8 and set(plain.tolist()) >= {2, 4, 5, 9}
        assert int((passes[plain] % 8 == 0).sum()) == 4
        # filled: the 4 wasted slots go to the best informative groups left out: o's 6 and 7 (p has none left);
        # informative groups run out after two, so two constant quota groups stay
        assert len(filled) == 8 and set(filled.tolist()) >= {2, 4, 5, 6, 7, 9}
        assert int((passes[filled] % 8 == 0).sum()) == 2
        assert set(filled.tolist()) - {2, 4, 5, 6, 7, 9} <= set(plain.tolist())


def test_fill_quota_takes_the_groups_closest_to_one_half_and_never_exceeds_the_batch():
    rng = np.random.default_rng(1)
    pool = pool_of({"m": 40, "o": 40})
    for trial in range(6):
        indices = np.sort(rng.choice(80, size=30, replace=False))
        p = np.where(indices < 40, rng.choice([0.0, 1.0, 0.5], size=30, p=[.45, .45, .1]), rng.random(30))
        passes = rng.binomial(G, p)
        rewards = binary_groups(passes)
        cfg = CurriculumConfig(batch_size=12, group_size=G, domain_ratios={"m": 0.5, "o": 0.5}, fill_quota=True,
                               seed=trial)
        kept = RLCSCurriculum(pool, cfg).select(indices, rewards)
        dom = (indices >= 40).astype(int)
        quota = allocate(12, np.array([0.5, 0.5]), np.bincount(dom, minlength=2))
        informative = (passes > 0) & (passes < G)
        dist = np.abs(passes / G - 0.5)
        is_kept = np.isin(np.arange(30), kept)
        assert len(kept) == 12 == len(set(kept.tolist()))
        assert int(informative[kept].sum()) == min(12, int(informative.sum()))    # as many as exist, up to B
        for d in (0, 1):
            mine_kept = is_kept & informative & (dom == d)
            left_out = ~is_kept & informative & (dom == d)
            if left_out.any() and mine_kept.any():        # within a domain: the kept are the closest to 1/2
                assert dist[left_out].min() >= dist[mine_kept].max() - 1e-12
            if (is_kept & (dom == d)).sum() > quota[d]:   # d took others' slots: no left-out group was closer
                others_left = ~is_kept & informative
                if others_left.any():
                    assert dist[others_left].min() >= dist[mine_kept].max() - 1e-12


def test_fill_quota_raises_the_informative_share_of_a_run_and_defaults_off():
    assert CurriculumConfig(batch_size=4).fill_quota is False
    pool = pool_of({"m": 30, "o": 30})

    def rollout(indices):                                     # m all-wrong, o informative (3/8)
        return np.where((np.asarray(indices) < 30)[:, None], 0.0, binary_groups([3] * len(indices)))

    shares = {}
    for fill in (False, True):
        cfg = CurriculumConfig(batch_size=8, group_size=G, fill_quota=fill, expansion=True, initial_expansion=2.0)
        it = RLCSCurriculum(pool, cfg).run_iteration(rollout)
        assert len(it.kept) == 8
        shares[fill] = it.metrics["kept_informative_share"]
        assert it.metrics["domain/m/kept"] + it.metrics["domain/o/kept"] == 8
    assert shares[False] == 0.5 and shares[True] == 1.0       # 16 rolled out: 8 m (constant), 8 o (informative)
