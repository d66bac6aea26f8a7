"""RLCS curriculum, its baselines and the offline difficulty pass, on simulated prompt populations with known
Bernoulli pass rates (the policy is simulated; every curriculum number is computed by the code under test)."""

import json
import math
import zlib

import grain
import numpy as np
import pytest

from glmv_jax.generate.loading import make_generate_fn
from glmv_jax.rl import difficulty as diff_lib
from glmv_jax.rl.curriculum import CurriculumConfig, RLCSCurriculum, weighting_fn
from glmv_jax.rl.samplers import CurriculumPrompts, DAPOSampler, PromptPool, UniformSampler, allocate, tier_of

G, B = 8, 64
DOMAINS = {"math": 0.5, "ocr": 0.3, "gui": 0.2}


def true_pass_rates(rng, n):
    """Like the paper's pilot: many prompts nearly always right, many nearly never, a minority in between."""
    kind = rng.choice(3, size=n, p=[0.45, 0.3, 0.25])
    return np.where(kind == 0, rng.uniform(0.9, 1.0, n),
                    np.where(kind == 1, rng.uniform(0.0, 0.05, n), rng.uniform(0.1, 0.9, n)))


def simulated_generate(p_by_id, seed=0):
    """generate_fn for counting prompts: each response is right with the prompt's true pass rate."""
    def generate(prompts, n):
        out = []
        for prompt in prompts:
            rng = np.random.default_rng([seed, zlib.crc32(prompt["id"].encode())])
            right = rng.random(n) < p_by_id[prompt["id"]]
            out.append([f"<think>count</think><answer><|begin_of_box|>{prompt['answer'] if ok else prompt['answer'] + 1}"
                        f"<|end_of_box|></answer>" for ok in right])
        return out
    return generate


def make_population(seed, n=1200):
    """(pool with offline difficulty from a simulated pass@8 pass, true pass rates)."""
    rng = np.random.default_rng(seed)
    p = true_pass_rates(rng, n)
    domains = rng.choice(list(DOMAINS), size=n, p=list(DOMAINS.values()))
    records = [{"id": f"q{i}", "domain": str(domains[i]), "answer": int(i % 7)} for i in range(n)]
    # Offline pass: counting-style answers scored with a plain exact match of the box (fast, no verifier).
    exact = lambda prompt, responses: [float(f">{prompt['answer']}<" in r) for r in responses]
    measured = diff_lib.measure_difficulty(records, simulated_generate({r["id"]: p[i] for i, r in enumerate(records)},
                                                                       seed), exact, k=8)
    pool = PromptPool.from_records(records, difficulties=diff_lib.difficulty_map(measured))
    return pool, p


def bernoulli_rollout(p, seed):
    rng = np.random.default_rng(seed)
    return lambda idx: rng.binomial(1, p[np.asarray(idx)][:, None], size=(len(idx), G)).astype(np.float64)


def run(sampler, rollout_fn, iterations):
    return [sampler.run_iteration(rollout_fn) for _ in range(iterations)]


# ------------------------------------------------------------------------------------------- pieces

def test_tiers_weights_and_allocation():
    np.testing.assert_array_equal(tier_of(np.array([0.0, 0.19, 0.2, 0.5, 0.99, 1.0]), 5), [0, 0, 1, 2, 4, 4])
    cfg = CurriculumConfig(batch_size=4, group_size=8, min_weight=0.05)
    f = weighting_fn(np.array([0.0, 0.1, 0.5, 0.9, 1.0]), cfg)
    assert f[2] == pytest.approx(1.0) and f[0] == f[4] == 0.05 and f[1] == pytest.approx(f[3])
    assert f[1] == pytest.approx((1 - 0.9 ** 8 - 0.1 ** 8) / (1 - 2 * 0.5 ** 8))
    g = weighting_fn(np.array([0.3, 0.5]), CurriculumConfig(batch_size=4, weighting="gaussian", width=0.2))
    assert g[1] == 1.0 and g[0] == pytest.approx(np.exp(-0.5))
    assert weighting_fn(np.array([0.2]), CurriculumConfig(batch_size=4, weighting="learnability"))[0] == pytest.approx(0.64)
    np.testing.assert_array_equal(allocate(10, np.array([0.5, 0.3, 0.2])), [5, 3, 2])
    np.testing.assert_array_equal(allocate(7, np.array([0.5, 0.3, 0.2])), [4, 2, 1])
    np.testing.assert_array_equal(allocate(10, np.array([0.5, 0.3, 0.2]), np.array([2, 10, 10])), [2, 5, 3])
    np.testing.assert_array_equal(allocate(5, np.array([1.0, 0.0]), np.array([3, 9])), [3, 2])


def test_pool_and_config_errors():
    recs = [{"id": "a", "domain": "math", "difficulty": 0.2}, {"id": "b", "domain": "ocr"}]
    pool = PromptPool.from_records(recs, difficulties={"b": 0.9})
    np.testing.assert_allclose(pool.difficulty, [0.2, 0.9])
    assert pool.domains == ("math", "ocr")
    assert PromptPool.from_records(recs).difficulty[1] == 0.5
    with pytest.raises(ValueError, match="duplicate prompt ids"):
        PromptPool.from_records(recs + [{"id": "a", "domain": "math"}])
    with pytest.raises(ValueError, match="has no 'domain'"):
        PromptPool.from_records([{"id": "a"}])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        PromptPool.from_records([{"id": "a", "domain": "m", "difficulty": 1.5}])
    with pytest.raises(ValueError, match="unknown \\['chart'\\], missing \\['ocr'\\]"):
        RLCSCurriculum(pool, CurriculumConfig(batch_size=1, domain_ratios={"math": 1, "chart": 1}))
    with pytest.raises(ValueError, match="exceeds"):
        UniformSampler(pool, 3)
    with pytest.raises(ValueError, match="weighting"):
        CurriculumConfig(batch_size=2, weighting="linear")
    with pytest.raises(ValueError, match="ema_decay"):
        CurriculumConfig(batch_size=2, ema_decay=1.0)
    rlcs = RLCSCurriculum(pool, CurriculumConfig(batch_size=1))
    with pytest.raises(ValueError, match="rewards must be"):
        rlcs.observe(np.array([0, 1]), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="finite"):
        rlcs.observe(np.array([0]), np.array([[0.0, -np.inf]]))
    with pytest.raises(ValueError, match="prompt indices"):
        rlcs.observe(np.array([5]), np.zeros((1, 4)))


# ------------------------------------------------------------------------------------------- RLCS behaviour

def test_expansion_ema_and_balanced_selection_by_hand():
    pool = PromptPool.from_records([{"id": f"p{i}", "domain": "m", "difficulty": 0.5} for i in range(40)])
    cfg = CurriculumConfig(batch_size=4, group_size=4, ema_decay=0.8, max_expansion=4.0)
    rlcs = RLCSCurriculum(pool, cfg)
    idx = rlcs.propose()
    assert len(idx) == 4 and len(set(idx)) == 4
    rewards = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], float)   # r = 0.5
    kept, m = rlcs.observe(idx, rewards)
    assert m["expansion_ratio"] == 2.0 and m["expansion_ema"] == pytest.approx(1.2)
    assert m["zero_var_share"] == 0.5 and m["kept_informative_share"] == 0.5
    assert m["domain/m/expansion_ratio"] == 2.0 and m["domain/m/count"] == 4 and m["domain/m/mean_reward"] == 0.4375
    assert sum(m[f"tier/{k}/count"] for k in range(5)) == 4 and m["tier/2/zero_var_share"] == 0.5
    assert rlcs.rollout_size() == 5 == m["next_rollout_prompts"]           # ceil(4 * 1.2)
    idx = rlcs.propose()
    rewards = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0.5, 0.5, 0.5, 0.5]], float)
    cfg2 = CurriculumConfig(batch_size=2, group_size=4)
    sel = RLCSCurriculum(pool, cfg2).select(idx, rewards)
    np.testing.assert_array_equal(sel, [1, 3])                              # the two non-constant groups
    kept, m = rlcs.observe(idx, rewards)                                    # r = 3/5 -> 2.5
    assert m["expansion_ratio"] == pytest.approx(2.5)
    assert m["expansion_ema"] == pytest.approx(0.8 * 1.2 + 0.2 * 2.5)
    assert len(kept) == 4 and {1, 3} <= set(kept.tolist())        # informative groups first
    _, m = rlcs.observe(rlcs.propose()[:3], np.ones((3, 4)))                 # r = 1 -> clamped
    assert m["expansion_ratio"] == 4.0
    by_balance = RLCSCurriculum(pool, CurriculumConfig(batch_size=1, group_size=4, select_by="balance"))
    np.testing.assert_array_equal(by_balance.select(np.arange(3), np.array([[1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5],
                                                                            [1, 1, 1, 0]], float)), [1])


def test_tiers_move_with_online_outcomes():
    pool = PromptPool.from_records([{"id": "hard", "domain": "m", "difficulty": 0.9},
                                    {"id": "easy", "domain": "m", "difficulty": 0.1}])
    rlcs = RLCSCurriculum(pool, CurriculumConfig(batch_size=1, group_size=8, prior_weight=8, memory=24))
    np.testing.assert_array_equal(rlcs.tiers(), [4, 0])
    expected_hard = [0.55, 0.7, 0.775]               # (w p + 8) / (w + 8), w = 8, 16, 24 (memory cap)
    for want in expected_hard:
        _, m = rlcs.observe(np.array([0, 1]), np.stack([np.ones(8), np.zeros(8)]))
        assert rlcs.pass_rate[0] == pytest.approx(want)
    np.testing.assert_array_equal(rlcs.tiers(), [1, 3])
    assert m["tier/1/size"] == 1 and m["tier/3/size"] == 1 and m["tier/0/size"] == 0
    for _ in range(6):                               # memory cap: the estimate keeps following the outcomes
        rlcs.observe(np.array([0]), np.zeros((1, 8)))
    assert rlcs.tiers()[0] == 4 and rlcs.times_sampled.tolist() == [9, 3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rlcs_yields_more_informative_groups_than_uniform(seed):
    pool, p = make_population(seed)
    uniform = run(UniformSampler(pool, B, seed=seed), bernoulli_rollout(p, seed + 10), 15)
    rlcs = RLCSCurriculum(pool, CurriculumConfig(batch_size=B, group_size=G, seed=seed))
    curriculum = run(rlcs, bernoulli_rollout(p, seed + 10), 15)
    no_expansion = run(RLCSCurriculum(pool, CurriculumConfig(batch_size=B, group_size=G, seed=seed, expansion=False)),
                       bernoulli_rollout(p, seed + 10), 15)
    share = lambda its, key: float(np.mean([it.metrics[key] for it in its[3:]]))
    u, c = share(uniform, "kept_informative_share"), share(curriculum, "kept_informative_share")
    assert c > u + 0.3, (c, u)                                         # measured about 0.92 vs 0.42
    # tier weighting alone (no oversampling) already rolls out more informative prompts
    assert share(no_expansion, "kept_informative_share") > u + 0.06
    assert all(len(it.kept) == B for it in curriculum)
    ema = curriculum[-1].metrics["expansion_ema"]
    assert 1.3 < ema < 3.0 and len(curriculum[-1].indices) == math.ceil(B * curriculum[-2].metrics["expansion_ema"] - 1e-6)
    assert all(len(it.indices) == B for it in uniform)


def test_domain_mixing_ratios():
    pool, p = make_population(3, n=900)
    ratios = {"math": 0.2, "ocr": 0.3, "gui": 0.5}                     # unlike the pool's 0.5 / 0.3 / 0.2
    rlcs = RLCSCurriculum(pool, CurriculumConfig(batch_size=50, group_size=G, domain_ratios=ratios, seed=3))
    rollout = bernoulli_rollout(p, 3)
    proposed = np.zeros(3)
    for it in run(rlcs, rollout, 8):
        kept_domains = np.bincount(pool.domain_index[it.indices[it.kept]], minlength=3)
        np.testing.assert_array_equal(kept_domains, [ratios[d] * 50 for d in pool.domains])
        proposed += np.bincount(pool.domain_index[it.indices], minlength=3)
        assert it.metrics["domain/gui/count"] == np.sum(pool.domain_index[it.indices] == pool.domains.index("gui"))
    np.testing.assert_allclose(proposed / proposed.sum(), [ratios[d] for d in pool.domains], atol=0.01)
    zero_ocr = RLCSCurriculum(pool, CurriculumConfig(batch_size=20, domain_ratios={"math": 1, "ocr": 0, "gui": 1}))
    assert not np.any(pool.domain_index[zero_ocr.propose()] == pool.domains.index("ocr"))


def test_state_save_restore_reproduces_draws():
    pool, p = make_population(4, n=500)
    cfg = CurriculumConfig(batch_size=32, group_size=G, seed=7)
    rollout_seed = lambda i: bernoulli_rollout(p, 100 + i)
    a = RLCSCurriculum(pool, cfg)
    for i in range(3):
        a.run_iteration(rollout_seed(i))
    state = json.loads(json.dumps(a.state_dict()))
    b = RLCSCurriculum(pool, cfg)
    b.load_state_dict(state)
    resumed = []
    for i in range(3, 5):
        ia, ib = a.run_iteration(rollout_seed(i)), b.run_iteration(rollout_seed(i))
        resumed.append(ia.indices)
        np.testing.assert_array_equal(ia.indices, ib.indices)
        np.testing.assert_array_equal(ia.kept, ib.kept)
        assert ia.metrics == ib.metrics
    fresh = RLCSCurriculum(pool, cfg)
    assert not np.array_equal(fresh.propose(), a.propose())
    other = PromptPool.from_records([{"id": "x", "domain": "math"}])
    with pytest.raises(ValueError, match="curriculum state is for a pool"):
        RLCSCurriculum(other, CurriculumConfig(batch_size=1)).load_state_dict(state)
    # The prompt iterator over a grain MapDataset: same prompts after set_state, and propose is idempotent.
    records = [{"id": i, "domain": d} for i, d in zip(pool.ids, (pool.domains[j] for j in pool.domain_index))]
    it = CurriculumPrompts(RLCSCurriculum(pool, cfg), grain.MapDataset.source(records))
    it.set_state(state)
    idx, prompts = next(it)
    np.testing.assert_array_equal(idx, resumed[0])
    np.testing.assert_array_equal(next(it)[0], idx)                    # propose is idempotent until observe
    assert [r["id"] for r in prompts] == [pool.ids[i] for i in idx]
    b2 = RLCSCurriculum(pool, cfg)
    b2.load_state_dict(it.get_state())
    np.testing.assert_array_equal(b2.propose(), idx)
    with pytest.raises(ValueError, match="dataset has"):
        CurriculumPrompts(b2, records[:3])


def test_uniform_is_deterministic_and_dapo_fills_the_batch():
    pool, p = make_population(5, n=800)
    u1, u2 = UniformSampler(pool, B, seed=1), UniformSampler(pool, B, seed=1)
    np.testing.assert_array_equal(u1.propose(), u2.propose())
    dapo = DAPOSampler(pool, B, gen_batch_size=B, max_rounds=10, seed=1)
    rollout = bernoulli_rollout(p, 5)
    for it in run(dapo, rollout, 3):
        rounds = it.metrics["generation_rounds"]
        assert len(it.kept) == B and it.metrics["kept_informative_share"] == 1.0
        assert len(it.indices) == rounds * B and len(set(it.indices)) == len(it.indices)
        informative_before_last = (it.rewards[:-B].std(axis=1) > 0).sum()
        assert informative_before_last < B <= (it.rewards.std(axis=1) > 0).sum()   # stopped at the first full round
        assert rounds >= 2
    hopeless = PromptPool.from_records([{"id": f"h{i}", "domain": "m", "difficulty": 1.0} for i in range(100)])
    it = DAPOSampler(hopeless, 8, gen_batch_size=16, max_rounds=3).run_iteration(lambda idx: np.zeros((len(idx), G)))
    assert it.metrics["generation_rounds"] == 3 and len(it.kept) == 0 and len(it.indices) == 48


# ------------------------------------------------------------------------------------------- offline difficulty

def fake_generate_factory(checkpoint, **kwargs):
    """--generator for the CLI test: the 'checkpoint' is a JSON file of true pass rates per prompt id."""
    with open(checkpoint) as f:
        p_by_id = json.load(f)
    return simulated_generate(p_by_id, kwargs["seed"])


def test_difficulty_measure_merge_and_cli(tmp_path):
    p_by_id = {"a": 1.0, "b": 0.0, "c": 0.5, "d": 0.25}
    prompts = [{"id": k, "domain": "counting", "answer": 3} for k in p_by_id]
    reward_fn = diff_lib.reward_fn_for("glm41v")                 # the project's reward system
    recs = diff_lib.measure_difficulty(prompts, simulated_generate(p_by_id), reward_fn, k=16, batch_size=3)
    assert [r.difficulty for r in recs][:2] == [0.0, 1.0]
    expected = [int((np.random.default_rng([0, zlib.crc32(k.encode())]).random(16) < v).sum()) for k, v in p_by_id.items()]
    assert [r.num_pass for r in recs] == expected and recs[0].pass_at_k and not recs[1].pass_at_k
    other = [diff_lib.DifficultyRecord("c", "counting", 0.0, 1.0, 16, 16, 1.0, {"m2": 0.0})]
    merged = diff_lib.merge_difficulties({"m1": recs, "m2": other}, human={"a": "very hard", "d": 0.5},
                                         human_weight=0.5)
    by_id = {r.id: r for r in merged}
    assert by_id["c"].difficulty == pytest.approx(recs[2].difficulty / 2) and by_id["c"].k == 32
    assert by_id["a"].difficulty == pytest.approx(0.5 * 0.0 + 0.5 * 0.9)
    assert by_id["d"].sources == {"m1": recs[3].difficulty, "human": 0.5}
    np.testing.assert_array_equal(diff_lib.assign_tiers(merged), tier_of(np.array([r.difficulty for r in merged]), 5))
    path = tmp_path / "d.jsonl"
    diff_lib.write_jsonl(merged, str(path))
    assert [r.__dict__ for r in diff_lib.read_jsonl(str(path))] == [r.__dict__ for r in merged]
    with pytest.raises(ValueError, match="unknown human difficulty label"):
        diff_lib.human_difficulty("impossible")
    with pytest.raises(ValueError, match="unknown prompt"):
        diff_lib.merge_difficulties({"m1": recs}, human={"zz": 0.1})
    with pytest.raises(ValueError, match="expected k=4"):
        diff_lib.measure_difficulty(prompts, lambda ps, n: [["x"]] * len(ps), reward_fn, k=4)

    prompts_path, ckpt, human, out = (tmp_path / n for n in ("prompts.jsonl", "ckpt.json", "human.jsonl", "out.jsonl"))
    prompts_path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    ckpt.write_text(json.dumps(p_by_id))
    human.write_text(json.dumps({"id": "b", "label": "easy"}) + "\n")
    cli = diff_lib.main(["--checkpoint", str(ckpt), "--prompts", str(prompts_path), "--out", str(out), "--k", "16",
                         "--human", str(human), "--generator", "tests.rl.test_curriculum:fake_generate_factory"])
    written = diff_lib.read_jsonl(str(out))
    assert [r.num_pass for r in written] == expected and [r.id for r in cli] == list(p_by_id)
    assert written[1].difficulty == pytest.approx(0.5 * 1.0 + 0.5 * 0.3)
    pool = PromptPool.from_records(prompts, difficulties=diff_lib.difficulty_map(written))
    np.testing.assert_allclose(pool.difficulty, [r.difficulty for r in written])
    with pytest.raises(SystemExit, match="cannot import"):
        diff_lib.main(["--checkpoint", "x", "--prompts", str(prompts_path), "--out", str(out),
                       "--generator", "no_such_module_xyz:f"])
    assert diff_lib._load_factory(diff_lib.DEFAULT_GENERATOR) is make_generate_fn       # the CLI's default resolves
    prompts_path.write_text(json.dumps({"id": "a", "domain": "counting"}) + "\n")
    with pytest.raises(ValueError, match="prompts.jsonl:1: prompt record has no 'answer'"):
        diff_lib.main(["--checkpoint", str(ckpt), "--prompts", str(prompts_path), "--out", str(out),
                       "--generator", "tests.rl.test_curriculum:fake_generate_factory"])


def test_difficulty_cli_skips_and_counts_records_with_invalid_answers(tmp_path, capsys):
    prompts = [{"id": "a", "domain": "counting", "answer": 3}, {"id": "bad", "domain": "counting", "answer": 2.5},
               {"id": "c", "domain": "counting", "answer": 4}]
    prompts_path, ckpt, out = tmp_path / "prompts.jsonl", tmp_path / "ckpt.json", tmp_path / "out.jsonl"
    prompts_path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    ckpt.write_text(json.dumps({"a": 1.0, "bad": 1.0, "c": 0.0}))
    cli = diff_lib.main(["--checkpoint", str(ckpt), "--prompts", str(prompts_path), "--out", str(out), "--k", "4",
                         "--generator", "tests.rl.test_curriculum:fake_generate_factory"])
    assert [r.id for r in cli] == [r.id for r in diff_lib.read_jsonl(str(out))] == ["a", "c"]
    shown = capsys.readouterr()
    assert "wrote 2 prompts" in shown.out and "skipped 1 with an invalid answer" in shown.out
    assert shown.err.count("warning") == 1
    assert "prompts.jsonl:2 (id='bad'): counting answer must be an integer, got 2.5" in shown.err
