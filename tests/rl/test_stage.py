"""rl/stage.py pieces that need no model: verifier rewards of trajectories and the count of verifier errors."""
import numpy as np

from glmv_jax.rewards import RewardResult
from glmv_jax.rl import stage
from glmv_jax.rl.rollout import Trajectories


def text_trajectories(prompt_index, texts, group_size=2) -> Trajectories:
    rows = len(prompt_index)
    zeros = np.zeros((rows, 1))
    return Trajectories(group_size, np.asarray(prompt_index), zeros.astype(np.int32), np.ones(rows, int),
                        zeros.astype(np.float32), zeros > 0, np.zeros(rows, bool), np.zeros(rows, bool), tuple(texts))


def test_score_groups_rewards_each_group_by_its_record_and_counts_verifier_errors(monkeypatch):
    records = [{"domain": "math", "answer": "1"}, {"domain": "ocr", "answer": "b"}, {"domain": "math", "answer": "2"}]
    calls = []

    def fake_rewards(domain, responses, answer, style):
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
