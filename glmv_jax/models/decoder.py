"""The GLM text decoder (docs/models.md): embeddings, stacked layers, final norm.

Dense GLM-4 layer (GLM-4.1V, 4.6V-Flash), "sandwich" norms:
    x = x + attn_out_norm(attn(attn_norm(x)));  x = x + mlp_out_norm(mlp(mlp_norm(x)))
MoE GLM-4.5-Air layer (GLM-4.5V, 4.6V), plain pre-norm with 2 norms:
    x = x + attn(attn_norm(x));                  x = x + ffn(mlp_norm(x))
where ffn is a dense SwiGLU in the first `first_k_dense_replace` layers (params text/layers) and the
routed MoE of glmv_jax.models.moe in the others (params text/moe_layers). Attention: GQA with q/k/v
bias, partial-rotary M-RoPE (interleaved pairs for dense, half-split for MoE), causal + segment mask.

Two ways through the same layers: the full sequence (`__call__`, `prefill`: training, prompts) and one token
per row over a KV cache (`decode_step`: generation). decode_step reads weights in decode layout, prepared once
before a decode loop (`decode_weights`: per-layer buffers, kernels [out, in] for layers.matvec, q/k/v and
gate/up fused), and per-layer caches [B, K, S, H] that each layer writes in place before reading, so a loop
over steps copies neither weights nor caches.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from glmv_jax.config import ModelConfig, TextConfig
from glmv_jax.models import attention
from glmv_jax.models.layers import (INIT_STD, Einsum, RMSNorm, SwiGLU, cached_attention, make_stack, matvec,
                                    normal_init, param, run_stack)
from glmv_jax.models.moe import MoE, moe_layer
from glmv_jax.models.rope import apply_text_rope, text_rope_tables
from glmv_jax.sharding.rules import constrain

ACT = ("act_batch", "act_length", "act_embed")


class AttentionContext(NamedTuple):
    """Per-call inputs shared by every layer: rope tables and the segment ids the mask is built from (causal by
    sequence slot within a segment; 0 = padding). A decode step's keys are its cache's valid slots instead."""
    cos: jax.Array          # [B, T, rotary_dim]
    sin: jax.Array
    q_segment: jax.Array    # [B, T] int
    kv_segment: jax.Array   # [B, S] int


class LayerCaches(NamedTuple):
    """One stack's KV cache in decode layout: k, v tuples of L per-layer arrays [B, K, S, H] (after rope);
    valid [B, S] bool, the slots a new query may attend to (shared by the layers)."""
    k: tuple
    v: tuple
    valid: jax.Array


class TextAttention(nnx.Module):
    """GQA self-attention; `impl` (ModelConfig.attention) picks the kernel of the uncached path."""

    def __init__(self, t: TextConfig, rngs: nnx.Rngs | None = None, impl: str = "auto"):
        d, n, k, h = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.dim_per_head
        bias = True if not t.moe else t.attention_bias        # HF hard-codes the dense q/k/v bias
        self.heads, self.kv_heads, self.head_dim = n, k, h
        self.layout, self.impl = t.rope_layout, attention.check_impl(impl)
        self.q = Einsum("BTD,DNH->BTNH", (d, n, h), ("embed", "heads", "head_dim"),
                        bias_shape=(n, h) if bias else None, bias_axes=("heads", "head_dim"), rngs=rngs)
        self.k = Einsum("BSD,DKH->BSKH", (d, k, h), ("embed", "kv_heads", "head_dim"),
                        bias_shape=(k, h) if bias else None, bias_axes=("kv_heads", "head_dim"), rngs=rngs)
        self.v = Einsum("BSD,DKH->BSKH", (d, k, h), ("embed", "kv_heads", "head_dim"),
                        bias_shape=(k, h) if bias else None, bias_axes=("kv_heads", "head_dim"), rngs=rngs)
        self.o = Einsum("BTNH,NHD->BTD", (n, h, d), ("heads", "head_dim", "embed"), rngs=rngs)

    def qkv(self, x: jax.Array, ctx: AttentionContext) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Projections with rope applied to q and k: q [B,T,N,H], k/v [B,T,K,H]."""
        q = checkpoint_name(self.q(x), "query_proj")
        k = checkpoint_name(self.k(x), "key_proj")
        v = checkpoint_name(self.v(x), "value_proj")
        return apply_text_rope(q, ctx.cos, ctx.sin, self.layout), apply_text_rope(k, ctx.cos, ctx.sin, self.layout), v

    def __call__(self, x: jax.Array, ctx: AttentionContext) -> jax.Array:
        return self.with_kv(x, ctx)[0]

    def with_kv(self, x: jax.Array, ctx: AttentionContext):
        """-> (output [B,T,D], (k, v) of these tokens): causal attention among the T tokens by sequence slot
        inside segments (training, prefill: ctx from `TextDecoder.context`)."""
        q, k, v = self.qkv(x, ctx)
        out = attention.attend(q, k, v, ctx.q_segment, ctx.kv_segment, self.head_dim ** -0.5, causal=True,
                               impl=self.impl)
        out = checkpoint_name(out, "attn_context")
        return checkpoint_name(self.o(out), "attn_out"), (k, v)

    def decode_weights(self, dtype) -> dict:
        """This layer's projections in decode layout (call on one layer, not a stack), in `dtype`: qkv
        [(N + 2K) H, D] (q, k, v rows fused), qkv_bias [(N + 2K) H] when biased, o [D, N H]."""
        w = {"qkv": jnp.concatenate([p.rows(dtype) for p in (self.q, self.k, self.v)]), "o": self.o.rows(dtype)}
        if hasattr(self.q, "bias"):
            w["qkv_bias"] = jnp.concatenate([p.bias[...].reshape(-1) for p in (self.q, self.k, self.v)]).astype(dtype)
        return w

    def decode_step(self, w: dict, x: jax.Array, ctx: AttentionContext, k_cache: jax.Array, v_cache: jax.Array,
                    valid: jax.Array, slot) -> tuple[jax.Array, jax.Array, jax.Array]:
        """with_kv for one token per row, x [B, D], with decode_weights `w` (self supplies only the shapes):
        the token's rotated key and value are written at `slot` of k/v_cache [B, K, S, H], then its query
        attends to the cache's valid slots (valid [B, S], which must include `slot`).
        -> (output [B, D], k_cache, v_cache)."""
        b, n, kv, h = x.shape[0], self.heads, self.kv_heads, self.head_dim
        qkv = matvec(x, w["qkv"])
        if "qkv_bias" in w:
            qkv = qkv + w["qkv_bias"]
        q, k, v = jnp.split(qkv, [n * h, (n + kv) * h], axis=-1)
        q = apply_text_rope(q.reshape(b, 1, n, h), ctx.cos, ctx.sin, self.layout)[:, 0]
        k = apply_text_rope(k.reshape(b, 1, kv, h), ctx.cos, ctx.sin, self.layout).reshape(b, kv, 1, h)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, slot, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.reshape(b, kv, 1, h).astype(v_cache.dtype), (0, 0, slot, 0))
        out = cached_attention(q, k_cache, v_cache, valid, h ** -0.5)
        return matvec(out.reshape(b, n * h), w["o"]), k_cache, v_cache


class DecoderLayer(nnx.Module):
    """One decoder layer; `routed` selects the MoE FFN (params under `moe`) instead of the SwiGLU `mlp`."""

    def __init__(self, t: TextConfig, routed: bool = False, rngs: nnx.Rngs | None = None, attention_impl: str = "auto"):
        d = t.hidden_size
        self.sandwich = not t.moe
        self.attn_norm = RMSNorm(d, t.rms_norm_eps, "embed", rngs)
        self.mlp_norm = RMSNorm(d, t.rms_norm_eps, "embed", rngs)
        if self.sandwich:
            self.attn_out_norm = RMSNorm(d, t.rms_norm_eps, "embed", rngs)
            self.mlp_out_norm = RMSNorm(d, t.rms_norm_eps, "embed", rngs)
        self.attn = TextAttention(t, rngs, attention_impl)
        if routed:
            self.moe = MoE(t, rngs=rngs)
        else:
            self.mlp = SwiGLU(d, t.intermediate_size, "embed", "mlp", rngs)

    def __call__(self, x: jax.Array, ctx: AttentionContext) -> tuple[jax.Array, dict]:
        """-> (x, aux): aux holds the MoE routing statistics of a routed layer, else nothing."""
        return self.with_kv(x, ctx)[:2]

    def with_kv(self, x: jax.Array, ctx: AttentionContext):
        """-> (x, aux, (k, v)): as __call__, also returning this layer's keys/values (TextAttention.with_kv)."""
        h, kv = self.attn.with_kv(self.attn_norm(x), ctx)
        x = self._residual(x, h, "attn_out_norm")
        h, aux = self.mlp_norm(x), {}
        if hasattr(self, "moe"):
            h, aux = self.moe(h, mask=ctx.q_segment > 0)
        else:
            h = self.mlp(h)
        return constrain(self._residual(x, h, "mlp_out_norm"), ACT), aux, kv

    def _residual(self, x: jax.Array, h: jax.Array, norm: str, w: dict | None = None) -> jax.Array:
        """x + h, h through the sandwich norm `norm` first in dense layers (its scale from decode weights w)."""
        if not self.sandwich:
            return x + h
        return x + getattr(self, norm)(h, None if w is None else w[norm])

    def _norms(self) -> list[str]:
        return ["attn_norm", "mlp_norm"] + (["attn_out_norm", "mlp_out_norm"] if self.sandwich else [])

    def decode_weights(self, dtype) -> dict:
        """This layer's weights for decode_step (call on one layer, not a stack): attn and mlp in decode layout
        (TextAttention / SwiGLU.decode_weights, in `dtype`); the norm scales and a routed layer's `moe`
        subtree as in the params."""
        w = {name: getattr(self, name).scale[...] for name in self._norms()}
        w["attn"] = self.attn.decode_weights(dtype)
        if hasattr(self, "moe"):
            w["moe"] = nnx.to_pure_dict(nnx.state(self.moe))
        else:
            w["mlp"] = self.mlp.decode_weights(dtype)
        return w

    def decode_step(self, w: dict, x: jax.Array, ctx: AttentionContext, k_cache: jax.Array, v_cache: jax.Array,
                    valid: jax.Array, slot) -> tuple[jax.Array, jax.Array, jax.Array]:
        """with_kv for one token per row, x [B, D], with decode_weights `w` (self, e.g. the stack, supplies
        only the structure) over this layer's cache (TextAttention.decode_step) -> (x, k_cache, v_cache)."""
        h, k_cache, v_cache = self.attn.decode_step(w["attn"], self.attn_norm(x, w["attn_norm"]), ctx, k_cache,
                                                    v_cache, valid, slot)
        x = self._residual(x, h, "attn_out_norm", w)
        h = self.mlp_norm(x, w["mlp_norm"])
        if hasattr(self, "moe"):
            h = moe_layer(w["moe"], h[:, None], self.moe.cfg, mask=ctx.q_segment > 0, options=self.moe.options)[0][:, 0]
        else:
            h = self.mlp.decode(w["mlp"], h)
        return constrain(self._residual(x, h, "mlp_out_norm", w)[:, None], ACT)[:, 0], k_cache, v_cache


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, rngs: nnx.Rngs | None = None):
        self.embedding = param(rngs, normal_init(INIT_STD), (vocab, dim), ("vocab", "embed"))

    def __call__(self, ids: jax.Array, dtype) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(dtype)


class TextDecoder(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None = None):
        t = self.t = config.text
        self.dtype = jnp.dtype(config.dtype)
        self.scan, self.remat = config.scan_layers, config.remat
        self.embed = Embed(t.vocab_size, t.hidden_size, rngs)
        if t.num_dense_layers:
            self.layers = make_stack(lambda r: DecoderLayer(t, False, r, config.attention), t.num_dense_layers, rngs)
        if t.num_hidden_layers > t.num_dense_layers:
            self.moe_layers = make_stack(lambda r: DecoderLayer(t, True, r, config.attention),
                                         t.num_hidden_layers - t.num_dense_layers, rngs)
        self.final_norm = RMSNorm(t.hidden_size, t.rms_norm_eps, "embed", rngs)

    def context(self, position_ids: jax.Array, segment_ids: jax.Array) -> AttentionContext:
        """Rope tables and mask vectors for a full (uncached) sequence: position_ids [3, B, T]."""
        cos, sin = text_rope_tables(position_ids, self.t, self.dtype)
        return AttentionContext(cos, sin, segment_ids, segment_ids)

    def __call__(self, x: jax.Array, ctx: AttentionContext) -> tuple[jax.Array, dict]:
        """x [B, T, D] input embeddings -> (final-normed hidden states [B, T, D], aux). aux["moe"] holds
        the routing statistics of the MoE layers stacked on a leading layer axis (moe.moe_layer)."""
        x = constrain(x.astype(self.dtype), ACT)
        call = lambda layer, h: layer(h, ctx)
        aux = {}
        if hasattr(self, "layers"):
            x, _ = run_stack(self.layers, x, call, scan=self.scan, remat=self.remat)
        if hasattr(self, "moe_layers"):
            x, aux["moe"] = run_stack(self.moe_layers, x, call, scan=self.scan, remat=self.remat)
        return self.final_norm(x), aux

    def stacks(self) -> list[str]:
        """Names of the layer stacks in order ("layers" dense, "moe_layers" routed)."""
        return [name for name in ("layers", "moe_layers") if hasattr(self, name)]

    def prefill(self, x: jax.Array, ctx: AttentionContext) -> tuple[jax.Array, dict]:
        """As __call__ over a whole prompt, also returning every stack's keys/values:
        (hidden [B, T, D], {stack: (k, v) [L, B, T, K, H]})."""
        x = constrain(x.astype(self.dtype), ACT)
        kvs = {}
        for name in self.stacks():
            def call(layer, h):
                h, _, kv = layer.with_kv(h, ctx)
                return h, kv
            x, kvs[name] = run_stack(getattr(self, name), x, call, scan=self.scan)
        return self.final_norm(x), kvs

    def step_context(self, positions: jax.Array, active: jax.Array) -> AttentionContext:
        """Rope tables and segments of one decode step: one token per row at M-RoPE position `positions` [B]
        (all three streams); active [B] bool (segment 1; 0 leaves a row out of the MoE routing statistics)."""
        pos = jnp.broadcast_to(positions.astype(jnp.int32)[None, :, None], (3, positions.shape[0], 1))
        cos, sin = text_rope_tables(pos, self.t, self.dtype)
        segment = active.astype(jnp.int32)[:, None]
        return AttentionContext(cos, sin, segment, segment)

    def decode_weights(self) -> dict[str, list[dict]]:
        """{stack: [DecoderLayer.decode_weights of each layer]}: every layer split out of its stack into
        buffers of its own (in the compute dtype), for decode_step."""
        out = {}
        for name in self.stacks():
            graphdef, state = nnx.split(getattr(self, name))
            count = jax.tree.leaves(state)[0].shape[0]
            layer = lambda i: nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
            out[name] = [layer(i).decode_weights(self.dtype) for i in range(count)]
        return out

    def decode_step(self, weights: dict[str, list[dict]], x: jax.Array, ctx: AttentionContext,
                    caches: dict[str, LayerCaches], slot) -> tuple[jax.Array, dict[str, LayerCaches]]:
        """One token per row, x [B, D] input embeddings, through every layer (unrolled: DecoderLayer.decode_step
        with `weights` from decode_weights and ctx from step_context), each layer writing its key/value at
        `slot` of its cache (the caches' valid must already include `slot`) -> (final-normed hidden [B, D],
        caches)."""
        x = constrain(x.astype(self.dtype)[:, None], ACT)[:, 0]
        out = {}
        for name in self.stacks():
            stack, cache, ks, vs = getattr(self, name), caches[name], [], []
            for w, k, v in zip(weights[name], cache.k, cache.v):
                x, k, v = stack.decode_step(w, x, ctx, k, v, cache.valid, slot)
                ks.append(k)
                vs.append(v)
            out[name] = LayerCaches(tuple(ks), tuple(vs), cache.valid)
        return self.final_norm(x), out
