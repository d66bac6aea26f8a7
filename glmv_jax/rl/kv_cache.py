"""Cached inference for the GLM-V model: prompt batching, prefill and one-token decode steps.

Layout (left padding). B rows of prompts padded on the left to a bucketed length Tp; the cache holds
S = Tp + N slots per row (N = max new tokens). Row b's prompt fills slots [Tp - len_b, Tp); the j-th new
token of every row is written at slot Tp + j. So all rows write the same slot each step (one
dynamic_update_slice for all layers), and per-row lengths only enter through
* the valid-slot mask (left padding never attended), and
* positions: the new token at unpadded index k = len_b + j gets position k + rope_delta_b on all three
  M-RoPE streams (architecture.md section 4.5).

    batch = batch_prompts(prompts, pad_id=0)            # numpy, rows repeated per sample, vision shared
    logits, caches = prefill(config, params, batch, cache_len=S)     # logits [B, V] at the last prompt token
    logits, caches = decode_step(config, params, caches, tokens, slot, positions, active)

Cache: {stack name: decoder.KVCache(k, v [L, B, S, K, H], valid [B, S])}, scanned alongside the layers.
Each layer scores its new key beside the cache (layers.cached_attention) and the new keys/values of all
layers are written once per step.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glmv_jax.config import ModelConfig
from glmv_jax.models.decoder import AttentionContext, KVCache
from glmv_jax.models.glmv import bucket, model_graph
from glmv_jax.models.rope import text_rope_tables

PROMPT_KEYS = ("input_ids", "token_type", "position_ids")
VISION_KEYS = ("pixel_values", "patch_pos", "patch_grid", "patch_segment")


# ----------------------------------------------------------------------------------------------
# Prompt dicts (transforms.PromptTransform) -> one left-padded batch (numpy)

def _check_prompt(i: int, p: dict, merge_area: int) -> int:
    """Validates one prompt dict; returns its number of vision tokens."""
    missing = [k for k in PROMPT_KEYS if k not in p]
    if missing:
        raise ValueError(f"prompt {i} lacks {missing}; prompts are transforms.PromptTransform dicts")
    ids = np.asarray(p["input_ids"])
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"prompt {i}: input_ids must be a non-empty [L] array, got shape {ids.shape}")
    if np.asarray(p["token_type"]).shape != ids.shape or np.asarray(p["position_ids"]).shape != (3, ids.size):
        raise ValueError(f"prompt {i}: token_type must be [L] and position_ids [3, L] for L={ids.size}")
    vision_tokens = int((np.asarray(p["token_type"]) > 0).sum())
    rows = 0 if p.get("pixel_values") is None else int(np.asarray(p["pixel_values"]).shape[0])
    if vision_tokens * merge_area != rows:
        raise ValueError(f"prompt {i}: {vision_tokens} vision tokens need {vision_tokens * merge_area} patch rows, "
                         f"got {rows}")
    return vision_tokens


def rope_delta(p: dict) -> int:
    """The prompt's rope delta: max position + 1 - length (recomputed when the dict lacks it)."""
    if "rope_delta" in p:
        return int(p["rope_delta"])
    return int(np.asarray(p["position_ids"]).max()) + 1 - len(p["input_ids"])


def batch_prompts(prompts: Sequence[dict], num_samples: int = 1, *, pad_id: int = 0, merge_area: int = 4,
                  min_length: int = 16, min_patches: int = 64) -> dict[str, np.ndarray]:
    """Prompt dicts -> a left-padded batch of len(prompts) * num_samples rows (prompt i at rows
    i*num_samples .. (i+1)*num_samples - 1), lengths bucketed (models.glmv.bucket) so recompiles are rare.

    Keys: input_ids, segment_ids (1 prompt, 0 padding), position_ids [3, B, Tp], token_type [B, Tp],
    prompt_len [B], rope_delta [B], vision_index [B, Tp] (the merged feature each vision token takes) and,
    when any prompt has vision, pixel_values [Np, Pd], patch_pos, patch_grid [Np, 2], patch_segment [Np]
    holding each distinct prompt's patches once (in prompt order, each in its token order)."""
    if not prompts:
        raise ValueError("no prompts to batch")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    counts = [_check_prompt(i, p, merge_area) for i, p in enumerate(prompts)]
    lengths = np.asarray([len(p["input_ids"]) for p in prompts])
    tp = bucket(int(lengths.max()), min_length)
    rows = len(prompts) * num_samples
    out = dict(input_ids=np.full((rows, tp), pad_id, np.int32), segment_ids=np.zeros((rows, tp), np.int32),
               position_ids=np.zeros((3, rows, tp), np.int32), token_type=np.zeros((rows, tp), np.int32),
               vision_index=np.zeros((rows, tp), np.int32), prompt_len=np.repeat(lengths, num_samples).astype(np.int32),
               rope_delta=np.repeat([rope_delta(p) for p in prompts], num_samples).astype(np.int32))
    offset, patches, frames = 0, [], 0
    for i, (p, n_vis) in enumerate(zip(prompts, counts)):
        length = lengths[i]
        types = np.asarray(p["token_type"], np.int32)
        index = np.zeros(length, np.int32)
        index[types > 0] = offset + np.arange(n_vis)
        for r in range(i * num_samples, (i + 1) * num_samples):
            sl = slice(tp - length, tp)
            out["input_ids"][r, sl] = p["input_ids"]
            out["segment_ids"][r, sl] = 1
            out["position_ids"][:, r, sl] = p["position_ids"]
            out["token_type"][r, sl] = types
            out["vision_index"][r, sl] = index
        if n_vis:
            frame = np.asarray(p["patch_frame"], np.int32)
            patches.append((p["pixel_values"], p["patch_pos"], p["patch_grid"], frame + frames + 1))
            frames += int(frame.max()) + 1
            offset += n_vis
    if patches:
        np_rows = bucket(offset * merge_area, min_patches)
        for key, col in zip(VISION_KEYS, zip(*patches)):
            arr = np.concatenate([np.asarray(a) for a in col])
            widths = [(0, np_rows - arr.shape[0])] + [(0, 0)] * (arr.ndim - 1)
            out[key] = np.pad(arr, widths, constant_values=1 if key == "patch_grid" else 0)
        out["pixel_values"] = out["pixel_values"].astype(np.float32)
        for key in ("patch_pos", "patch_grid", "patch_segment"):
            out[key] = out[key].astype(np.int32)
    return out


# ----------------------------------------------------------------------------------------------
# Prefill and decode (jax; jit the caller)

def _model(config: ModelConfig, params: Any):
    graphdef, _ = model_graph(config)
    return nnx.merge(graphdef, params)


def _logits(model, hidden: jax.Array) -> jax.Array:
    """hidden [B, D] -> fp32 logits [B, V] (the lm_head of GlmV.__call__)."""
    kernel = model.lm_head.kernel[...].astype(hidden.dtype)
    return jnp.einsum("BD,DV->BV", hidden, kernel, preferred_element_type=jnp.float32)


def embed_prompts(model, batch: dict) -> jax.Array:
    """Token embeddings with vision features at the vision tokens (feature vision_index[b, t])."""
    x = model.text.embed(batch["input_ids"], model.dtype)
    if batch.get("pixel_values") is None:
        return x
    features = model.vision(batch["pixel_values"], batch["patch_pos"], batch["patch_grid"], batch["patch_segment"])
    return jnp.where((batch["token_type"] > 0)[..., None], features[batch["vision_index"]].astype(x.dtype), x)


def prefill(config: ModelConfig, params: Any, batch: dict, cache_len: int) -> tuple[jax.Array, dict[str, KVCache]]:
    """Runs the left-padded prompts (batch_prompts) -> (logits [B, V] fp32 at the last prompt token,
    caches with the prompts in slots [0, Tp) and room up to `cache_len`)."""
    model = _model(config, params)
    segment = batch["segment_ids"]
    tp = segment.shape[1]
    if cache_len < tp:
        raise ValueError(f"cache_len {cache_len} is shorter than the padded prompt length {tp}")
    hidden, kvs = model.text.prefill(embed_prompts(model, batch),
                                     model.text.context(batch["position_ids"], segment))
    valid = jnp.pad(segment > 0, [(0, 0), (0, cache_len - tp)])
    grow = lambda a: jnp.pad(a, [(0, 0), (0, 0), (0, cache_len - tp), (0, 0), (0, 0)])
    caches = {name: KVCache(grow(k), grow(v), valid) for name, (k, v) in kvs.items()}
    return _logits(model, hidden[:, -1]), caches


def decode_step(config: ModelConfig, params: Any, caches: dict[str, KVCache], tokens: jax.Array, slot: jax.Array,
                positions: jax.Array, active: jax.Array) -> tuple[jax.Array, dict[str, KVCache]]:
    """Feeds one token per row: tokens [B] int, written at cache `slot` (scalar, same for all rows), with
    M-RoPE position `positions` [B] on all three streams; active [B] bool (routing mask of MoE layers).
    -> (next-token logits [B, V] fp32, caches with the tokens' keys/values written)."""
    model = _model(config, params)
    pos = jnp.broadcast_to(positions.astype(jnp.int32)[None, :, None], (3,) + tokens.shape + (1,))
    cos, sin = text_rope_tables(pos, config.text, model.text.dtype)
    index = jnp.broadcast_to(jnp.asarray(slot, jnp.int32), tokens.shape)[:, None]
    segment = active.astype(jnp.int32)[:, None]
    ctx = AttentionContext(cos, sin, index, index, segment, segment)
    x = model.text.embed(tokens[:, None], model.dtype)
    hidden, kvs = model.text.decode(x, ctx, caches)
    out = {}
    for name, (k, v) in kvs.items():
        cache = caches[name]
        at = (0, 0, slot, 0, 0)
        out[name] = KVCache(jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), at),
                            jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), at),
                            cache.valid.at[:, slot].set(True))
    return _logits(model, hidden[:, 0]), out
