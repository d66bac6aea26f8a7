"""rl/stage.py pieces that need no model: verifier rewards of trajectories and the count of verifier errors,
honest metrics, the RL prompt stream, and the answer-budget checks made before anything compiles."""
import ml_collections
import numpy as np
import pytest

from experiments.configs import demo
from experiments.configs import rl as rl_config
from glmv_jax.data import synthetic
from glmv_jax.data.tokenizer import suite_tokenizer
from glmv_jax.evaluation.evaluate import check_answer_budget, longest_gold_response
from glmv_jax.rewards import RewardResult
from glmv_jax.rl import stage
from glmv_jax.rl.rollout import Trajectories
from glmv_jax.rl.samplers import Iteration
from glmv_jax.train.experiment import setup


def text_trajectories(prompt_index, texts, group_size=2) -> Trajectories:
    rows = len(prompt_index)
    zeros = np.zeros((rows, 1))
    return Trajectories(group_size, np.asarray(prompt_index), zeros.astype(np.int32), np.ones(rows, int),
                        zeros.astype(np.float32), zeros > 0, np.zeros(rows, bool), np.zeros(rows, bool), tuple(texts))


def test_score_groups_rewards_each_group_by_its_record_and_counts_verifier_errors(monkeypatch):
    records = [{"domain": "math", "answer": "1"}, {"domain": "ocr", "answer": "b"}, {"domain": "math", "answer": "2"}]
    calls = []

    def fake_rewards(domain, responses, answer, style, verifier_override=None):
        assert verifier_override is None
        calls.append((domain, list(responses), answer, style))
        return [RewardResult(0.0, True, None, {"reason": "verifier_error"}) if t == "boom" else
                RewardResult(float(t == answer), True, t, {}) for t in responses]

    monkeypatch.setattr(stage, "compute_rewards", fake_rewards)
    traj = text_trajectories([2, 2, 0, 0, 1, 1], ["2", "boom", "1", "1", "boom", "boom"])
    rewards, errors = stage.score_groups(records, traj, "glm41v")
    np.testing.assert_array_equal(rewards, [[1, 0], [1, 1], [0, 0]])
    assert rewards.dtype == np.float32 and errors == 3
    assert calls == [("math", ["2", "boom"], "2", "glm41v"), ("math", ["1", "1"], "1", "glm41v"),
                     ("ocr", ["boom", "boom"], "b", "glm41v")]


def test_trainable_groups_divide_by_minibatches_times_micro_batches():
    kept = np.arange(7)
    assert stage.trainable_groups(kept, 2, 4).tolist() == [0, 1, 2, 3, 4, 5]
    assert stage.trainable_groups(kept, 3, 4).tolist() == [0, 1, 2, 3]
    assert stage.trainable_groups(kept[:1], 3, 4).tolist() == []


def test_honest_metrics_report_all_rolled_out_groups_beside_the_kept_ones():
    rewards = np.array([[1, 0], [0, 0], [1, 1], [1, 0]], float)      # groups of prompts 0, 1, 2, 3
    iteration = Iteration(np.array([0, 1, 2, 3]), rewards, np.array([0, 3]), {})
    row = {"reward": 0.5, "informative_share": 0.5, "kept_informative_share": 1.0}
    out = stage.honest_metrics(iteration, np.array([0, 3]), row, {"clip_frac": 0.1, "neg_logp": 0.7},
                               ["a", "a", "b", "b"])
    assert out["reward_rolled"] == 0.5 and out["reward_kept"] == 0.5
    assert out["reward_rolled/a"] == 0.25 and out["reward_rolled/b"] == 0.75
    assert out["reward_kept/a"] == 0.5 and out["reward_kept/b"] == 0.5    # selection: b's kept group is its worse
    assert out["informative_share_trained"] == 1.0 and out["clip_fraction"] == 0.1 and out["entropy"] == 0.7


def test_rl_prompts_come_from_their_own_stream():
    for domain in synthetic.DOMAINS:
        sft = synthetic.generate(domain, 64, seed=0, split="train")
        rl = synthetic.generate(domain, 64, seed=0, split="rl", kind="rl")
        held = synthetic.generate(domain, 64, seed=0, split="heldout", kind="rl")
        images = lambda recs: {r["images"][0].tobytes() for r in recs}
        assert not images(sft) & images(rl) and not images(rl) & images(held) and not images(sft) & images(held)


def test_max_new_tokens_must_hold_the_longest_gold_response():

    cfg = ml_collections.ConfigDict({"data": {"source": "synthetic", "domains": ["gui", "ocr"], "image_size": 56}})
    tok = suite_tokenizer(512)
    longest = longest_gold_response(cfg, tok, "rl", 16, 0, None)
    assert longest["gui"] > longest["ocr"] > 3
    check_answer_budget(cfg, tok, "rl", 16, 0, None, longest["gui"], "rl")          # exactly enough: fine
    with pytest.raises(ValueError, match=rf"rl.max_new_tokens = {longest['gui'] - 1} .*gui needs {longest['gui']}"):
        check_answer_budget(cfg, tok, "rl", 16, 0, None, longest["gui"] - 1, "rl")


def test_the_stage_refuses_an_eval_budget_shorter_than_a_gold_response_before_compiling(tmp_path):
    cfg = demo.get_config("smoke").stages[2]
    cfg.eval.max_new_tokens = 5
    with pytest.raises(ValueError, match=r"eval.max_new_tokens = 5 .*'heldout'.*gui needs \d+"):
        stage.run_rl(setup(cfg, str(tmp_path)))
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "offline_difficulty.json").exists()


def test_the_rl_config_budgets_hold_every_gold_response(tmp_path):
    """rl.py's laptop settings (runlocal / tiny presets) pass the checks run_rl makes before it compiles."""
    cfg = rl_config.get_config("runlocal")
    exp = setup(cfg, str(tmp_path))
    check_answer_budget(cfg, exp.tokenizer, "rl", cfg.rl.prompts_per_domain, cfg.seed, cfg.rl.prompt_tiers,
                        cfg.rl.max_new_tokens, "rl")
    check_answer_budget(cfg, exp.tokenizer, "heldout", cfg.eval.per_domain, cfg.eval.seed, cfg.eval.tiers,
                        cfg.eval.max_new_tokens, "eval")
