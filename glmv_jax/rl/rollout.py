"""From generation to GRPO batches.

    out = rollout_batch(config, params, prompts, num_samples=8, max_new_tokens=512, stop_ids=tok.stop_ids, rng=key)
    out["batch"]: BATCH.md keys over prompt + response rows (input_ids, targets, loss_mask, segment_ids,
                  position_ids, token_type, vision keys) + response_mask and old_logp aligned with targets
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from glmv_jax.batch import bucket, frame_lengths, frame_rows, longest_frame, pack_patches, patch_frames, rope_delta
from glmv_jax.config import ModelConfig
from glmv_jax.generate.sampler import generate, response_text

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


def rollout_batch(config: ModelConfig, params: Any, prompts: Sequence[dict], *, num_samples: int,
                  max_new_tokens: int, stop_ids: Sequence[int], rng: Any, temperature: float = 1.0,
                  top_p: float = 1.0, top_k: int = 0, thinking_budget: int | None = None,
                  force_answer_ids: Sequence[int] | None = None, seq_len: int | None = None,
                  num_minibatches: int | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """Samples `num_samples` responses per prompt and builds the GRPO update's batch.

    -> {"batch": assemble_batch(...) (old_logp at the sampling temperature, response_mask without forced
    tokens), "generation": generate's output, "prompt_index": [B], "responses": texts (with a tokenizer:
    special tokens kept, the turn-ending stop token dropped) or None}."""
    gen = generate(config, params, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   top_k=top_k, stop_ids=stop_ids, rng=rng, thinking_budget=thinking_budget,
                   force_answer_ids=force_answer_ids, num_samples=num_samples)
    batch = assemble_batch(prompts, num_samples, gen, seq_len=seq_len, num_minibatches=num_minibatches,
                           merge_area=config.vision.spatial_merge_size ** 2)
    texts = None
    if tokenizer is not None:
        texts = [response_text(tokenizer, gen["tokens"][r], gen["lengths"][r]) for r in range(len(gen["lengths"]))]
    return {"batch": batch, "generation": gen, "responses": texts,
            "prompt_index": np.repeat(np.arange(len(prompts)), num_samples)}
