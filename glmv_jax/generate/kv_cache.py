"""Cached inference for the GLM-V model: prefill and one-token decode steps over a prompt batch.

Layout (left padding). B rows of prompts padded on the left to a bucketed length Tp; the cache holds
S = Tp + N slots per row (N = max new tokens). Row b's prompt fills slots [Tp - len_b, Tp); the j-th new
token of every row is written at slot Tp + j. So all rows write the same slot each step (one
dynamic_update_slice for all layers), and per-row lengths only enter through
* the valid-slot mask (left padding never attended), and
* positions: the new token at unpadded index k = len_b + j gets position k + rope_delta_b on all three
  M-RoPE streams (batch.rope_delta).

    batch = batch_prompts(prompts, pad_id=0)     # generate/prompts.py: rows repeated per sample, vision shared
    logits, caches = prefill(config, params, batch, cache_len=S)     # logits [B, V] at the last prompt token
    logits, caches = decode_step(config, params, caches, tokens, slot, positions, active)

prefill returns {stack name: KVCache(k, v [L, B, S, K, H], valid [B, S])}; decode_step takes and returns
that form, preparing the model's decode weights on every call. A decode loop (the sampler's) prepares them
once and carries per-layer caches (models/decoder.py, TextDecoder.decode_step; no per-step weight copies):
    weights = decode_weights(config, params); caches = unstack_caches(caches)        # once, before the loop
    logits, caches = decode_layers(config, params, weights, caches, tokens, slot, positions, active)
Vision batches carry patch_frames (the ViT's per-frame attention layout; batch.patch_frames).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from glmv_jax.config import ModelConfig
from glmv_jax.models.decoder import LayerCaches
from glmv_jax.models.glmv import model_graph


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
