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

Cache: {stack name: decoder.KVCache(k, v [L, B, S, K, H], valid [B, S])}, scanned alongside the layers.
Each layer scores its new key beside the cache (layers.cached_attention) and the new keys/values of all
layers are written once per step.

The sampler's loop uses the per-layer form instead (same math, no per-step weight copies):
    weights = decode_weights(config, params); caches = unstack_caches(caches)        # once, before the loop
    logits, caches = decode_layers(config, params, weights, caches, tokens, slot, positions, active)
Vision batches carry patch_frames (the ViT's per-frame attention layout; batch.patch_frames).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glmv_jax.config import ModelConfig
from glmv_jax.models.decoder import ACT, AttentionContext, KVCache
from glmv_jax.models.glmv import model_graph
from glmv_jax.models.moe import moe_layer
from glmv_jax.models.rope import apply_text_rope, text_rope_tables
from glmv_jax.sharding.rules import constrain


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
    """Token embeddings with vision features at the vision tokens (feature vision_index[b, t]); the ViT attends
    per frame when the batch has patch_frames (else over all patch rows, segment-masked: same values)."""
    x = model.text.embed(batch["input_ids"], model.dtype)
    if batch.get("pixel_values") is None:
        return x
    features = model.vision(batch["pixel_values"], batch["patch_pos"], batch["patch_grid"], batch["patch_segment"],
                            batch.get("patch_frames"))
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


def _decode_context(config: ModelConfig, model, tokens, slot, positions, active) -> AttentionContext:
    """Rope tables at `positions` [B] (all three M-RoPE streams) and mask vectors of one decode step."""
    pos = jnp.broadcast_to(positions.astype(jnp.int32)[None, :, None], (3,) + tokens.shape + (1,))
    cos, sin = text_rope_tables(pos, config.text, model.text.dtype)
    index = jnp.broadcast_to(jnp.asarray(slot, jnp.int32), tokens.shape)[:, None]
    segment = active.astype(jnp.int32)[:, None]
    return AttentionContext(cos, sin, index, index, segment, segment)


def decode_step(config: ModelConfig, params: Any, caches: dict[str, KVCache], tokens: jax.Array, slot: jax.Array,
                positions: jax.Array, active: jax.Array) -> tuple[jax.Array, dict[str, KVCache]]:
    """Feeds one token per row: tokens [B] int, written at cache `slot` (scalar, same for all rows), with
    M-RoPE position `positions` [B] on all three streams; active [B] bool (routing mask of MoE layers).
    -> (next-token logits [B, V] fp32, caches with the tokens' keys/values written)."""
    model = _model(config, params)
    ctx = _decode_context(config, model, tokens, slot, positions, active)
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


# ----------------------------------------------------------------------------------------------
# Decode over per-layer weights (the sampler's loop). A one-token step reads every weight once, so its speed
# is the weights' streaming rate. Slicing layer l out of the stacked [L, ...] weights inside the loop (the
# scan of decode_step) makes XLA:CPU copy each layer's weights every step, and XLA:CPU streams a matvec's
# [in, out] kernel ~1.5x slower than an [out, in] one. So before the loop, once, decode_weights splits the
# stack into per-layer buffers in "decode layout" (q/k/v fused into one [(N+2K)H, D] matrix, o [D, NH],
# gate/up fused [2F, D], down [D, F], lm_head [V, D], all in the compute dtype); the layers run unrolled
# (decode_layers, the math of DecoderLayer.with_kv) and each layer's cache is its own [B, K, S, H] buffer,
# written in place before it is read. The sampler's test inspects the loop's HLO for weight copies.

class DecodeWeights(NamedTuple):
    """layers: {stack name: [one dict per layer]} (decode layout; norms and a routed layer's `moe` subtree as
    in params); lm_head [V, D]."""
    layers: dict
    lm_head: jax.Array


class LayerCaches(NamedTuple):
    """One stack's cache split per layer: k, v tuples of L arrays [B, K, S, H]; valid [B, S] (shared)."""
    k: tuple
    v: tuple
    valid: jax.Array


def _rows(kernel: jax.Array, inputs: int) -> jax.Array:
    """A kernel whose first `inputs` axes are contracted -> [outputs (flattened), inputs (flattened)]."""
    n_in = int(np.prod(kernel.shape[:inputs]))
    return kernel.reshape(n_in, -1).T


def _decode_layer(layer: dict, dtype) -> dict:
    """One layer's params (PARAM_TREE.md, no L axis) -> decode layout."""
    attn = layer["attn"]
    out = {k: v for k, v in layer.items() if k.endswith("norm") or k == "moe"}
    out["qkv"] = jnp.concatenate([_rows(attn[n]["kernel"], 1) for n in "qkv"]).astype(dtype)
    if "bias" in attn["q"]:
        out["qkv_bias"] = jnp.concatenate([attn[n]["bias"].reshape(-1) for n in "qkv"]).astype(dtype)
    out["o"] = _rows(attn["o"]["kernel"], 2).astype(dtype)
    if "mlp" in layer:
        mlp = layer["mlp"]
        out["gate_up"] = jnp.concatenate([_rows(mlp["gate"]["kernel"], 1), _rows(mlp["up"]["kernel"], 1)]).astype(dtype)
        out["down"] = _rows(mlp["down"]["kernel"], 1).astype(dtype)
    return out


def decode_weights(config: ModelConfig, params: Any) -> DecodeWeights:
    """Per-layer decode weights from the stacked params, materialized once as separate buffers
    (optimization_barrier: XLA may not fold the slices and transposes into the loop that reads them)."""
    text, layers, dtype = params["text"], {}, jnp.dtype(config.dtype)
    for name in ("layers", "moe_layers"):
        if name in text:
            count = jax.tree.leaves(text[name])[0].shape[0]
            layers[name] = [_decode_layer(jax.tree.map(lambda a, i=i: a[i], text[name]), dtype) for i in range(count)]
    lm_head = params["lm_head"]["kernel"].T.astype(dtype)
    return jax.lax.optimization_barrier(DecodeWeights(layers, lm_head))


def unstack_caches(caches: dict[str, KVCache]) -> dict[str, LayerCaches]:
    """Stacked caches (prefill: k, v [L, B, S, K, H]) -> per-layer caches ([B, K, S, H] each)."""
    split = lambda a: tuple(a[i].transpose(0, 2, 1, 3) for i in range(a.shape[0]))
    return {name: LayerCaches(split(c.k), split(c.v), c.valid) for name, c in caches.items()}


def stack_caches(caches: dict[str, LayerCaches]) -> dict[str, KVCache]:
    """Per-layer caches -> stacked KVCache (k, v [L, B, S, K, H])."""
    stack = lambda arrays: jnp.stack(arrays).transpose(0, 1, 3, 2, 4)
    return {name: KVCache(stack(c.k), stack(c.v), c.valid) for name, c in caches.items()}


def _matvec(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [B, D] times a decode-layout kernel w [F, D] -> [B, F]."""
    return jnp.einsum("BD,FD->BF", x, w)


def _attend(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, valid: jax.Array, scale: float) -> jax.Array:
    """q [B, N, H] over the cache (k/v [B, K, S, H], valid [B, S]) -> [B, N, H]: the math of
    layers.dot_product_attention (fp32 scores and softmax, probabilities in v's dtype)."""
    b, n, h = q.shape
    kv_heads = k_cache.shape[1]
    q = q.reshape(b, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("BKGH,BKSH->BKGS", q, k_cache, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(valid[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    return jnp.einsum("BKGS,BKSH->BKGH", probs, v_cache).reshape(b, n, h)


def _layer_step(t, stack, w: dict, x: jax.Array, ctx: AttentionContext, k_cache, v_cache, valid, slot):
    """One decoder layer for one token per row (DecoderLayer.with_kv with a cache), x [B, D] ->
    (x, k_cache, v_cache) with this token's key/value written at `slot` (valid must already include it)."""
    b, n, kv, h = x.shape[0], t.num_attention_heads, t.num_key_value_heads, t.dim_per_head
    norm = lambda name, y: nnx.merge(nnx.split(getattr(stack, name))[0], w[name])(y)
    qkv = _matvec(norm("attn_norm", x), w["qkv"])
    if "qkv_bias" in w:
        qkv = qkv + w["qkv_bias"]
    q = qkv[:, :n * h].reshape(b, 1, n, h)
    k = qkv[:, n * h:(n + kv) * h].reshape(b, 1, kv, h)
    v = qkv[:, (n + kv) * h:].reshape(b, kv, 1, h)
    q = apply_text_rope(q, ctx.cos, ctx.sin, t.rope_layout)[:, 0]
    k = apply_text_rope(k, ctx.cos, ctx.sin, t.rope_layout).reshape(b, kv, 1, h)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, slot, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, slot, 0))
    out = _matvec(_attend(q, k_cache, v_cache, valid, h ** -0.5).reshape(b, n * h), w["o"])
    sandwich = "attn_out_norm" in w
    x = x + (norm("attn_out_norm", out) if sandwich else out)
    y = norm("mlp_norm", x)
    if "moe" in w:
        y, _ = moe_layer(w["moe"], y[:, None], t, mask=ctx.q_segment > 0, options=stack.moe.options)
        y = y[:, 0]
    else:
        f = w["down"].shape[1]
        gate_up = _matvec(y, w["gate_up"])
        y = _matvec(jax.nn.silu(gate_up[:, :f]) * gate_up[:, f:], w["down"])
    x = x + (norm("mlp_out_norm", y) if sandwich else y)
    return constrain(x[:, None], ACT)[:, 0], k_cache, v_cache


def decode_layers(config: ModelConfig, params: Any, weights: DecodeWeights, caches: dict[str, LayerCaches],
                  tokens: jax.Array, slot: jax.Array, positions: jax.Array, active: jax.Array
                  ) -> tuple[jax.Array, dict[str, LayerCaches]]:
    """decode_step over per-layer weights (decode_weights) and caches (unstack_caches), same arguments and
    math, the layers unrolled; params supply the embedding and final norm. -> (logits [B, V] fp32, caches)."""
    model = _model(config, params)
    ctx = _decode_context(config, model, tokens, slot, positions, active)
    x = constrain(model.text.embed(tokens[:, None], model.dtype), ACT)[:, 0]
    out = {}
    for name in model.text.stacks():
        stack, cache = getattr(model.text, name), caches[name]
        valid = cache.valid.at[:, slot].set(True)
        ks, vs = [], []
        for w, k_cache, v_cache in zip(weights.layers[name], cache.k, cache.v):
            x, k_cache, v_cache = _layer_step(config.text, stack, w, x, ctx, k_cache, v_cache, valid, slot)
            ks.append(k_cache)
            vs.append(v_cache)
        out[name] = LayerCaches(tuple(ks), tuple(vs), valid)
    hidden = model.text.final_norm(x)
    logits = jnp.einsum("BD,VD->BV", hidden, weights.lm_head, preferred_element_type=jnp.float32)
    return logits, out
