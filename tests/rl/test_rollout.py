"""rl/rollout.py without a model: Trajectories (groups, scoring, concatenation) and the GRPO batch built from
them, including the [M, k, ...] layout for grad_accum_steps."""
import numpy as np
import pytest

from glmv_jax.rl.rollout import Trajectories, assemble_batch, grpo_batch

G, N = 2, 3                                   # group size, max new tokens


def text_prompt(length: int, first: int) -> dict:
    ids = np.arange(first, first + length, dtype=np.int32)
    return {"input_ids": ids, "token_type": np.zeros(length, np.int32),
            "position_ids": np.tile(np.arange(length, dtype=np.int32), (3, 1))}


PROMPTS = [text_prompt(4, 10), text_prompt(2, 20), text_prompt(3, 30), text_prompt(5, 40)]


def fake_trajectories(prompt_index, seed=0) -> Trajectories:
    """Trajectories as rollout() returns them, with random tokens; row r answers PROMPTS[prompt_index[r]]."""
    rng = np.random.default_rng(seed)
    rows = len(prompt_index)
    lengths = rng.integers(1, N + 1, rows)
    mask = np.arange(N)[None] < lengths[:, None]
    return Trajectories(G, np.asarray(prompt_index), rng.integers(50, 90, (rows, N)).astype(np.int32), lengths,
                        np.where(mask, -rng.random((rows, N)), 0.0).astype(np.float32), mask,
                        lengths == N, np.zeros(rows, bool), tuple(f"text{r}" for r in range(rows)))


def test_groups_scoring_and_concatenation():
    traj = fake_trajectories(np.repeat([3, 0, 2], G))
    assert traj.num_groups == 3
    scored = traj.scored([[1, 0], [0, 0], [1, 1]])
    np.testing.assert_array_equal(scored.group_rewards(), [[1, 0], [0, 0], [1, 1]])
    picked = scored.groups([2, 0])
    assert picked.prompt_index.tolist() == [2, 2, 3, 3] and picked.texts == ("text4", "text5", "text0", "text1")
    np.testing.assert_array_equal(picked.tokens, traj.tokens[[4, 5, 0, 1]])
    assert picked.rewards.tolist() == [1, 1, 1, 0]
    both = Trajectories.concatenate([scored.groups([0]), scored.groups([1, 2])])
    np.testing.assert_array_equal(both.tokens, traj.tokens)
    assert both.texts == traj.texts and both.rewards.tolist() == scored.rewards.tolist()
    with pytest.raises(ValueError, match="all parts or in none"):
        Trajectories.concatenate([traj, scored])
    with pytest.raises(ValueError, match="not scored"):
        traj.group_rewards()
    with pytest.raises(ValueError, match="4 rewards for 6"):
        traj.scored([1, 0, 1, 0])


def test_grpo_batch_is_the_assembled_batch_of_its_groups_with_advantages():
    traj = fake_trajectories(np.repeat([3, 1, 0, 2], G), seed=1)
    advantages = np.arange(4 * G, dtype=np.float32)
    whole = assemble_batch([PROMPTS[i] for i in (3, 1, 0, 2)], G, traj.generation(), seq_len=16)
    batch = grpo_batch(PROMPTS, traj, advantages, num_minibatches=2, seq_len=16)
    assert batch["input_ids"].shape == (2, 4, 16) and batch["position_ids"].shape == (2, 3, 4, 16)
    np.testing.assert_array_equal(batch["advantages"], advantages.reshape(2, 4))
    for key in ("input_ids", "targets", "old_logp", "response_mask"):
        np.testing.assert_array_equal(batch[key].reshape(whole[key].shape), whole[key])
    # grad_accum_steps 2: the same rows as 4 consecutive micro-batches, laid out [M=2, k=2, 2 rows, ...]
    micro = grpo_batch(PROMPTS, traj, advantages, num_minibatches=2, grad_accum_steps=2, seq_len=16)
    assert micro["input_ids"].shape == (2, 2, 2, 16) and micro["position_ids"].shape == (2, 2, 3, 2, 16)
    np.testing.assert_array_equal(micro["advantages"], advantages.reshape(2, 2, 2))
    np.testing.assert_array_equal(micro["old_logp"].reshape(whole["old_logp"].shape), whole["old_logp"])
    np.testing.assert_array_equal(micro["position_ids"][1, 0], whole["position_ids"][:, 4:6])
