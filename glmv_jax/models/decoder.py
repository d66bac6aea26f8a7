"""The GLM text decoder (architecture.md sections 3 and 5.1): embeddings, stacked layers, final norm.

Dense GLM-4 layer (GLM-4.1V, 4.6V-Flash), "sandwich" norms:
    x = x + attn_out_norm(attn(attn_norm(x)));  x = x + mlp_out_norm(mlp(mlp_norm(x)))
MoE GLM-4.5-Air layer (GLM-4.5V, 4.6V), plain pre-norm with 2 norms:
    x = x + attn(attn_norm(x));                  x = x + ffn(mlp_norm(x))
where ffn is a dense SwiGLU in the first `first_k_dense_replace` layers (params text/layers) and the
routed MoE of glmv_jax.models.moe in the others (params text/moe_layers). Attention: GQA with q/k/v
bias, partial-rotary M-RoPE (interleaved pairs for dense, half-split for MoE), causal + segment mask.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from glmv_jax.config import ModelConfig, TextConfig
from glmv_jax.models import attention
from glmv_jax.models.layers import (INIT_STD, Einsum, RMSNorm, SwiGLU, cached_attention, make_stack, normal_init,
                                    param, run_stack)
from glmv_jax.models.moe import MoE
from glmv_jax.models.rope import apply_text_rope, text_rope_tables
from glmv_jax.sharding.rules import constrain

ACT = ("act_batch", "act_length", "act_embed")


class AttentionContext(NamedTuple):
    """Per-call inputs shared by every layer: rope tables and the small vectors the mask is built from.
    q_index/kv_index are sequence slots (a KV cache only changes the kv side); segments 0 = padding."""
    cos: jax.Array          # [B, T, rotary_dim]
    sin: jax.Array
    q_index: jax.Array      # [B, T] int
    kv_index: jax.Array     # [B, S] int
    q_segment: jax.Array    # [B, T] int
    kv_segment: jax.Array   # [B, S] int


class KVCache(NamedTuple):
    """Keys/values of earlier tokens for one layer stack: k, v [L, B, S, K, H] (after rope), and which
    slots hold a token a new query may attend to: valid [B, S] bool (shared by all layers)."""
    k: jax.Array
    v: jax.Array
    valid: jax.Array


class TextAttention(nnx.Module):
    """GQA self-attention; `impl` (ModelConfig.attention) picks the kernel of the uncached path."""

    def __init__(self, t: TextConfig, rngs: nnx.Rngs | None = None, impl: str = "auto"):
        d, n, k, h = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.dim_per_head
        bias = True if not t.moe else t.attention_bias        # HF hard-codes the dense q/k/v bias
        self.head_dim, self.layout, self.impl = h, t.rope_layout, attention.check_impl(impl)
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

    def with_kv(self, x: jax.Array, ctx: AttentionContext, cache: tuple | None = None):
        """-> (output [B,T,D], (k, v) of these tokens). cache None: causal attention among the T tokens by
        sequence slot inside segments (training, prefill: ctx from `TextDecoder.context`); cache (k [B,S,K,H],
        v, valid [B,S]): one decode step (T = 1) over the cache and itself."""
        q, k, v = self.qkv(x, ctx)
        scale = self.head_dim ** -0.5
        if cache is None:
            out = attention.attend(q, k, v, ctx.q_segment, ctx.kv_segment, scale, causal=True, impl=self.impl)
        else:
            out = cached_attention(q, k, v, *cache, scale)
        out = checkpoint_name(out, "attn_context")
        return checkpoint_name(self.o(out), "attn_out"), (k, v)


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

    def with_kv(self, x: jax.Array, ctx: AttentionContext, cache: tuple | None = None):
        """-> (x, aux, (k, v)): as __call__, also returning this layer's keys/values (TextAttention.with_kv)."""
        h, kv = self.attn.with_kv(self.attn_norm(x), ctx, cache)
        x = x + (self.attn_out_norm(h) if self.sandwich else h)
        h, aux = self.mlp_norm(x), {}
        if hasattr(self, "moe"):
            h, aux = self.moe(h, mask=ctx.q_segment > 0)
        else:
            h = self.mlp(h)
        x = x + (self.mlp_out_norm(h) if self.sandwich else h)
        return constrain(x, ACT), aux, kv


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
        index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
        return AttentionContext(cos, sin, index, index, segment_ids, segment_ids)

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

    def decode(self, x: jax.Array, ctx: AttentionContext, caches: dict[str, KVCache]) -> tuple[jax.Array, dict]:
        """One new token per row, x [B, 1, D], over `caches` ({stack: KVCache}, read only) ->
        (hidden [B, 1, D], {stack: (k, v) [L, B, 1, K, H]}) for the caller to write at the token's slot."""
        x = constrain(x.astype(self.dtype), ACT)
        kvs = {}
        for name in self.stacks():
            valid = caches[name].valid
            def call(layer, h, kv_l):
                h, _, kv = layer.with_kv(h, ctx, (kv_l[0], kv_l[1], valid))
                return h, kv
            x, kvs[name] = run_stack(getattr(self, name), x, call, scan=self.scan,
                                     xs=(caches[name].k, caches[name].v))
        return self.final_norm(x), kvs
