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

prefill returns {stack name: KVCache(k, v [L, B, S, K, H], valid [B, S])}; decode_step takes and returns
that form, preparing the model's decode weights on every call. A decode loop (the sampler's) prepares them
once and carries per-layer caches (models/decoder.py, TextDecoder.decode_step; no per-step weight copies):
    weights = decode_weights(config, params); caches = unstack_caches(caches)        # once, before the loop
    logits, caches = decode_layers(config, params, weights, caches, tokens, slot, positions, active)
Vision batches carry patch_frames (the ViT's per-frame attention layout; see patch_frames).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glmv_jax.config import ModelConfig
from glmv_jax.models.decoder import LayerCaches
from glmv_jax.models.glmv import bucket, model_graph
from glmv_jax.models.vision import frame_slots

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


def longest_frame(prompts: Sequence[dict]) -> int:
    """Patch rows of the largest image / video frame among the prompts (0 without vision)."""
    sizes = [np.bincount(np.asarray(p["patch_frame"]).reshape(-1)).max() for p in prompts
             if p.get("pixel_values") is not None and len(p["pixel_values"])]
    return int(max(sizes, default=0))


def prompt_segments(prompts: Sequence[dict]) -> np.ndarray:
    """patch_segment [Np] of the prompts' patch rows as batch_prompts lays them out (unpadded): frames
    numbered 1.. in prompt order."""
    segments, frames = [np.zeros(0, np.int64)], 0
    for p in prompts:
        if p.get("pixel_values") is not None and len(p["pixel_values"]):
            frame = np.asarray(p["patch_frame"]).reshape(-1)
            segments.append(frame + frames + 1)
            frames += int(frame.max()) + 1
    return np.concatenate(segments)


def frame_rows(patch_segment: np.ndarray, frame_len: int) -> int:
    """Rows of `frame_len` slots that vision.frame_slots packs the frames of patch_segment [Np] into."""
    return frame_slots(patch_segment, frame_len=frame_len).shape[0]


def patch_frames(patch_segment: np.ndarray, frame_len: int | None = None, frames: int | None = None) -> np.ndarray:
    """The ViT attention layout [F, L] (vision.frame_slots) of a batch's patch rows: rows of L = frame_len slots
    (default bucket(longest frame, 256), as glmv.prepare_inputs), F = frames rows (default the rows needed,
    bucketed), so similar batches share a compiled ViT."""
    seg = np.asarray(patch_segment)
    if frame_len is None:
        frame_len = bucket(int(np.bincount(seg[seg > 0]).max()), 256) if (seg > 0).any() else 1
    if frames is None:
        frames = bucket(frame_rows(seg, frame_len), 1)
    return frame_slots(seg, frames, frame_len)


def batch_prompts(prompts: Sequence[dict], num_samples: int = 1, *, pad_id: int = 0, merge_area: int = 4,
                  min_length: int = 16, min_patches: int = 64, frame_len: int | None = None,
                  frames: int | None = None) -> dict[str, np.ndarray]:
    """Prompt dicts -> a left-padded batch of len(prompts) * num_samples rows (prompt i at rows
    i*num_samples .. (i+1)*num_samples - 1), lengths bucketed (models.glmv.bucket) so recompiles are rare.

    Keys: input_ids, segment_ids (1 prompt, 0 padding), position_ids [3, B, Tp], token_type [B, Tp],
    prompt_len [B], rope_delta [B], vision_index [B, Tp] (the merged feature each vision token takes) and,
    when any prompt has vision, pixel_values [Np, Pd], patch_pos, patch_grid [Np, 2], patch_segment [Np]
    holding each distinct prompt's patches once (in prompt order, each in its token order), and patch_frames
    [F, L] (the ViT's per-frame attention layout: patch_frames(patch_segment, frame_len, frames))."""
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
    offset, patches, seen_frames = 0, [], 0
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
            patches.append((p["pixel_values"], p["patch_pos"], p["patch_grid"], frame + seen_frames + 1))
            seen_frames += int(frame.max()) + 1
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
        out["patch_frames"] = patch_frames(out["patch_segment"], frame_len, frames)
    return out


# ----------------------------------------------------------------------------------------------
# Prefill and decode (jax; jit the caller)

class KVCache(NamedTuple):
    """One layer stack's cache as prefill returns it: k, v [L, B, S, K, H] (after rope); valid [B, S] bool,
    the slots a new query may attend to (shared by the layers)."""
    k: jax.Array
    v: jax.Array
    valid: jax.Array


class DecodeWeights(NamedTuple):
    """layers: {stack name: [DecoderLayer.decode_weights of each layer]}; lm_head [V, D] (layers.matvec)."""
    layers: dict
    lm_head: jax.Array


def _model(config: ModelConfig, params: Any):
    graphdef, _ = model_graph(config)
    return nnx.merge(graphdef, params)


def prefill(config: ModelConfig, params: Any, batch: dict, cache_len: int) -> tuple[jax.Array, dict[str, KVCache]]:
    """Runs the left-padded prompts (batch_prompts) -> (logits [B, V] fp32 at the last prompt token,
    caches with the prompts in slots [0, Tp) and room up to `cache_len`)."""
    model = _model(config, params)
    segment = batch["segment_ids"]
    tp = segment.shape[1]
    if cache_len < tp:
        raise ValueError(f"cache_len {cache_len} is shorter than the padded prompt length {tp}")
    hidden, kvs = model.text.prefill(model.embed(batch), model.text.context(batch["position_ids"], segment))
    valid = jnp.pad(segment > 0, [(0, 0), (0, cache_len - tp)])
    grow = lambda a: jnp.pad(a, [(0, 0), (0, 0), (0, cache_len - tp), (0, 0), (0, 0)])
    caches = {name: KVCache(grow(k), grow(v), valid) for name, (k, v) in kvs.items()}
    return model.logits(hidden[:, -1]), caches


def decode_weights(config: ModelConfig, params: Any) -> DecodeWeights:
    """The model's weights in decode layout (TextDecoder.decode_weights; lm_head [V, D]), materialized once as
    separate per-layer buffers (optimization_barrier: XLA may not fold the slices and transposes into the
    loop that reads them)."""
    model = _model(config, params)
    return jax.lax.optimization_barrier(DecodeWeights(model.text.decode_weights(), model.lm_head.rows(model.dtype)))


def unstack_caches(caches: dict[str, KVCache]) -> dict[str, LayerCaches]:
    """Stacked caches (prefill: k, v [L, B, S, K, H]) -> per-layer caches ([B, K, S, H] each)."""
    split = lambda a: tuple(a[i].transpose(0, 2, 1, 3) for i in range(a.shape[0]))
    return {name: LayerCaches(split(c.k), split(c.v), c.valid) for name, c in caches.items()}


def stack_caches(caches: dict[str, LayerCaches]) -> dict[str, KVCache]:
    """Per-layer caches -> stacked KVCache (k, v [L, B, S, K, H])."""
    stack = lambda arrays: jnp.stack(arrays).transpose(0, 1, 3, 2, 4)
    return {name: KVCache(stack(c.k), stack(c.v), c.valid) for name, c in caches.items()}


def decode_layers(config: ModelConfig, params: Any, weights: DecodeWeights, caches: dict[str, LayerCaches],
                  tokens: jax.Array, slot: jax.Array, positions: jax.Array, active: jax.Array
                  ) -> tuple[jax.Array, dict[str, LayerCaches]]:
    """Feeds one token per row: tokens [B] int, written at cache `slot` (scalar, same for all rows), with
    M-RoPE position `positions` [B] on all three streams; active [B] bool (routing mask of MoE layers).
    weights from decode_weights, caches from unstack_caches; params supply the embedding and final norm.
    -> (next-token logits [B, V] fp32, caches with the tokens' keys/values written)."""
    model = _model(config, params)
    caches = {name: c._replace(valid=c.valid.at[:, slot].set(True)) for name, c in caches.items()}
    hidden, caches = model.text.decode_step(weights.layers, model.text.embed(tokens, model.dtype),
                                            model.text.step_context(positions, active), caches, slot)
    return model.logits(hidden, weights.lm_head), caches


def decode_step(config: ModelConfig, params: Any, caches: dict[str, KVCache], tokens: jax.Array, slot: jax.Array,
                positions: jax.Array, active: jax.Array) -> tuple[jax.Array, dict[str, KVCache]]:
    """decode_layers over stacked caches (prefill's form), the decode weights prepared in this call: for
    single steps; a loop over steps prepares them once (decode_weights, unstack_caches, decode_layers)."""
    logits, caches = decode_layers(config, params, decode_weights(config, params), unstack_caches(caches), tokens,
                                   slot, positions, active)
    return logits, stack_caches(caches)
