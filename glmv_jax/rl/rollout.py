"""From generation to GRPO batches: rollouts are Trajectories; the update's batch is built once, for the
groups trained on.

    traj = rollout(config, params, prompts, num_samples=8, max_new_tokens=512, stop_ids=tok.stop_ids, rng=key,
                   tokenizer=tok)                       # rows grouped by prompt, texts decoded
    traj = traj.scored(rewards)                         # rewards [n, G] from the verifiers
    kept = traj.groups(positions)                       # the groups to train on, in that order
    batch = grpo_batch(prompts, kept, advantages, num_minibatches=M)
    batch: BATCH.md keys over prompt + response rows (input_ids, targets, loss_mask, segment_ids, position_ids,
           token_type, vision keys) + response_mask, old_logp (aligned with targets) and advantages
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from glmv_jax.batch import bucket, frame_lengths, frame_rows, longest_frame, pack_patches, patch_frames, rope_delta
from glmv_jax.config import ModelConfig
from glmv_jax.generate.sampler import generate, response_text

# ----------------------------------------------------------------------------------------------
# Trajectories

@dataclasses.dataclass(frozen=True, eq=False)
class Trajectories:
    """Sampled responses, group_size rows per prompt (groups contiguous). R rows, N = max_new_tokens."""
    group_size: int
    prompt_index: np.ndarray          # [R] int: the prompt row r answers
    tokens: np.ndarray                # [R, N] int32 (pad after the end)
    lengths: np.ndarray               # [R] tokens emitted (stop token included)
    logprobs: np.ndarray              # [R, N] fp32 old log-probs at the sampling temperature (0 after the end)
    response_mask: np.ndarray         # [R, N] bool: emitted and not forced
    truncated: np.ndarray             # [R] bool: hit max_new_tokens
    forced: np.ndarray                # [R] bool: the answer was forced at the thinking budget
    texts: tuple[str, ...] | None     # [R] decoded responses (special tokens kept, turn end dropped)
    rewards: np.ndarray | None = None  # [R] fp32, once scored

    ROWS = ("prompt_index", "tokens", "lengths", "logprobs", "response_mask", "truncated", "forced")

    @property
    def num_groups(self) -> int:
        return len(self.prompt_index) // self.group_size

    def rows(self, rows: np.ndarray) -> "Trajectories":
        """The trajectories of `rows` (whole groups, in order)."""
        rows = np.asarray(rows, int)
        pick = lambda x: None if x is None else (tuple(x[r] for r in rows) if isinstance(x, tuple) else x[rows])
        return dataclasses.replace(self, **{k: pick(getattr(self, k)) for k in self.ROWS + ("texts", "rewards")})

    def groups(self, positions: Sequence[int]) -> "Trajectories":
        """The groups at `positions` (0 .. num_groups - 1), in that order."""
        g = self.group_size
        return self.rows(np.concatenate([np.arange(p * g, (p + 1) * g) for p in positions] or [np.zeros(0, int)]))

    def scored(self, rewards: Any) -> "Trajectories":
        """With rewards [num_groups, G] (or [R])."""
        rewards = np.asarray(rewards, np.float32).reshape(-1)
        if rewards.shape != self.prompt_index.shape:
            raise ValueError(f"{rewards.size} rewards for {len(self.prompt_index)} trajectories")
        return dataclasses.replace(self, rewards=rewards)

    def group_rewards(self) -> np.ndarray:
        """[num_groups, G]."""
        if self.rewards is None:
            raise ValueError("the trajectories are not scored yet")
        return self.rewards.reshape(-1, self.group_size)

    def generation(self) -> dict[str, np.ndarray]:
        """assemble_batch's generation arrays."""
        return dict(tokens=self.tokens, logprobs=self.logprobs, response_mask=self.response_mask, lengths=self.lengths)

    @classmethod
    def concatenate(cls, parts: Sequence["Trajectories"]) -> "Trajectories":
        """Rows of `parts` one after the other (one group size; texts and rewards in all parts or in none)."""
        if len({p.group_size for p in parts}) != 1:
            raise ValueError(f"trajectories of group sizes {sorted({p.group_size for p in parts})} do not concatenate")

        def join(key):
            xs = [getattr(p, key) for p in parts]
            if all(x is None for x in xs):
                return None
            if any(x is None for x in xs):
                raise ValueError(f"trajectories to concatenate need {key} in all parts or in none")
            return sum(xs, ()) if isinstance(xs[0], tuple) else np.concatenate(xs)
        return cls(parts[0].group_size, **{k: join(k) for k in cls.ROWS + ("texts", "rewards")})


def rollout(config: ModelConfig, params: Any, prompts: Sequence[dict], *, num_samples: int, max_new_tokens: int,
            stop_ids: Sequence[int], rng: Any, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
            thinking_budget: int | None = None, force_answer_ids: Sequence[int] | None = None,
            tokenizer: Any = None, compact_every: int = 0) -> Trajectories:
    """`num_samples` responses per prompt (generate's rows: prompt i at rows [i * n, (i + 1) * n)) ->
    Trajectories with prompt_index into `prompts`; texts decoded with a tokenizer (else None). compact_every:
    generate's (S > 0: finished rows dropped every S decode steps; the same trajectories)."""
    gen = generate(config, params, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   top_k=top_k, stop_ids=stop_ids, rng=rng, thinking_budget=thinking_budget,
                   force_answer_ids=force_answer_ids, num_samples=num_samples, compact_every=compact_every)
    texts = None
    if tokenizer is not None:
        texts = tuple(response_text(tokenizer, gen["tokens"][r], gen["lengths"][r]) for r in range(len(gen["lengths"])))
    return Trajectories(num_samples, np.repeat(np.arange(len(prompts)), num_samples), gen["tokens"], gen["lengths"],
                        gen["logprobs"], gen["response_mask"], gen["truncated"], gen["forced"], texts)


# ----------------------------------------------------------------------------------------------
# GRPO batches

def _row(prompt: dict, tokens: np.ndarray, logprobs: np.ndarray, response_mask: np.ndarray, length: int, t: int):
    """One prompt + response row (right-padded to t): BATCH.md arrays plus response_mask / old_logp, where
    entry k is about targets[k] (the token after position k)."""
    ids = np.concatenate([np.asarray(prompt["input_ids"], np.int32), tokens[:length].astype(np.int32)])
    plen, total = len(prompt["input_ids"]), len(ids)
    if total > t:
        raise ValueError(f"prompt ({plen}) + response ({length}) tokens exceed seq_len {t}")
    row = dict(input_ids=np.zeros(t, np.int32), targets=np.zeros(t, np.int32), segment_ids=np.zeros(t, np.int32),
               token_type=np.zeros(t, np.int32), position_ids=np.zeros((3, t), np.int32),
               response_mask=np.zeros(t, np.float32), old_logp=np.zeros(t, np.float32))
    row["input_ids"][:total] = ids
    row["targets"][:total - 1] = ids[1:]
    row["segment_ids"][:total] = 1
    row["token_type"][:plen] = prompt["token_type"]
    row["position_ids"][:, :plen] = prompt["position_ids"]
    row["position_ids"][:, plen:total] = np.arange(plen, total) + rope_delta(prompt)
    at = slice(plen - 1, plen - 1 + length)            # position k predicts response token k - plen + 1
    row["response_mask"][at] = response_mask[:length]
    row["old_logp"][at] = logprobs[:length] * response_mask[:length]
    row["loss_mask"] = row["response_mask"].copy()
    return row


def assemble_batch(prompts: Sequence[dict], num_samples: int, generation: dict, *, seq_len: int | None = None,
                   num_minibatches: int | None = None, merge_area: int = 4) -> dict[str, np.ndarray]:
    """The GRPO batch for `generate`'s output over `prompts` (rows grouped per prompt). num_minibatches None:
    one batch (patch arrays over all rows); M: every key stacked on a leading [M] axis, each minibatch of
    B/M consecutive rows holding its own patches (grpo.make_grpo_update(..., presplit=True)). Vision batches
    carry patch_frames [F, L] (batch.patch_frames; the same F, L in every minibatch)."""
    rows = len(prompts) * num_samples
    lengths = generation["lengths"]
    need = max(len(prompts[r // num_samples]["input_ids"]) + int(lengths[r]) for r in range(rows))
    t = seq_len or bucket(need, 16)
    per_row = [_row(prompts[r // num_samples], generation["tokens"][r], generation["logprobs"][r],
                    generation["response_mask"][r].astype(np.float32), int(lengths[r]), t) for r in range(rows)]
    m = num_minibatches or 1
    if rows % m:
        raise ValueError(f"{rows} rollout rows are not divisible by num_minibatches={m}")
    size = rows // m
    groups = [[prompts[r // num_samples] for r in range(g * size, (g + 1) * size)] for g in range(m)]
    has_vision = any(p.get("pixel_values") is not None and len(p["pixel_values"]) for p in prompts)
    patches = None
    if has_vision:
        most = max(sum(len(p["pixel_values"]) for p in grp if p.get("pixel_values") is not None) for grp in groups)
        patches = bucket(max(most, merge_area), 64)
        patch_dim = next(np.asarray(p["pixel_values"]).shape[1] for p in prompts if p.get("pixel_values") is not None)
    minibatches = []
    for g in range(m):
        chunk = per_row[g * size:(g + 1) * size]
        mb = {k: np.stack([r[k] for r in chunk], axis=1 if k == "position_ids" else 0) for k in chunk[0]}
        if has_vision:
            mb.update(pack_patches(groups[g], patches, patch_dim))
        minibatches.append(mb)
    if has_vision:          # the ViT's per-frame layout, one [F, L] shape for all minibatches
        frame_len = bucket(longest_frame(prompts), 256)
        frames = bucket(max(frame_rows(frame_lengths(mb["patch_segment"]), frame_len) for mb in minibatches), 1)
        for mb in minibatches:
            mb["patch_frames"] = patch_frames(mb["patch_segment"], frame_len, frames)
    if num_minibatches is None:
        return minibatches[0]
    return {k: np.stack([mb[k] for mb in minibatches]) for k in minibatches[0]}


def grpo_batch(prompts: Sequence[dict], traj: Trajectories, advantages: Any, *, num_minibatches: int = 1,
               grad_accum_steps: int = 1, seq_len: int | None = None, merge_area: int = 4) -> dict[str, np.ndarray]:
    """The presplit GRPO update batch (grpo.make_grpo_update(..., presplit=True)) of trajectories whose row r
    answers prompts[traj.prompt_index[r]]: every key [M, ...] (grad_accum_steps k > 1: [M, k, ...]), each of
    the M * k (micro-)batches of consecutive rows with its own patches; advantages [R] -> [M, (k,) R / (M k)]."""
    m, k = int(num_minibatches), int(grad_accum_steps)
    group_prompts = [prompts[int(i)] for i in traj.prompt_index[::traj.group_size]]
    batch = assemble_batch(group_prompts, traj.group_size, traj.generation(), seq_len=seq_len,
                           num_minibatches=m * k, merge_area=merge_area)
    batch["advantages"] = np.asarray(advantages, np.float32).reshape(m * k, -1)
    return {key: v.reshape((m, k) + v.shape[1:]) for key, v in batch.items()} if k > 1 else batch
