"""Context parallelism: causal self-attention with the sequence split over a mesh axis ("sequence").

    out = context_parallel_attention(q, k, v, q_segment, kv_segment, scale, causal=True)

q [B,T,N,H], k/v [B,T,K,H] (GQA, N = K*G), segment ids [B,T] int (0 = padding; 1..k the samples packed
in a row), keys in query order (self-attention). Query t sees key s iff q_segment[t] == kv_segment[s] > 0
and, when causal, s <= t by global sequence slot. The values are those of
glmv_jax.models.layers.blocked_attention on one device, computed inside `jax.shard_map` with T split in
P contiguous shards of T/P tokens (shard i holds global slots i*T/P .. (i+1)*T/P - 1):

  impl="ring"       k/v/segment blocks travel around the axis by `ppermute` while every shard keeps its
                    queries; an online softmax (fp32 running max, sum and output) takes one block per step,
                    and blocks wholly in a shard's future are skipped (`lax.cond`). A custom VJP runs the
                    backward as a second ring (dk/dv accumulators travel with their k/v block and arrive
                    home after P hops), so memory stays O(T/P) per shard: no [T, T] scores, no gathered k/v.
  impl="allgather"  all-gathers k/v/segments and attends locally to all T keys with the causal mask
                    (simple; memory O(T) per shard, scores [T/P, T]); gradients by autodiff.

Padding queries (segment 0) see no key: the ring gives 0 there, all-gather a finite average (like the
single-device reference, whose value there is arbitrary). Compare outputs on non-padding rows only.

Sharding: the batch dimension stays split over the rules' `act_batch` axes and heads over the rules'
`act_heads`/`act_kv_heads` axes (only when both N and K divide; otherwise heads are replicated inside the
map). Mesh axes that do not divide a dimension are dropped for it, as in rules.logical_to_spec. The mesh
is `mesh`, else the one of `rules.activation_sharding`, else the `jax.set_mesh` mesh; with no mesh, or
an `axis` of size 1, this is plain `blocked_attention`. Causal work is unbalanced across shards with
contiguous sharding (shard P-1 does P blocks, shard 0 one); zig-zag load balancing is not implemented.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from glmv_jax.models.layers import blocked_attention, causal_segment_mask, dot_product_attention
from glmv_jax.parallel import rules as rules_lib

IMPLS = ("ring", "allgather")
_NEG = float(jnp.finfo(jnp.float32).min)


# ----------------------------------------------------------------------------------------------
# Mesh and partition specs

def _resolve_mesh(mesh) -> tuple[Any, Any]:
    """(mesh or None, rules): the given mesh, else activation_sharding's, else jax.set_mesh's."""
    active = rules_lib._ACTIVE.get()
    rules = active[1] if active is not None else rules_lib.DEFAULT
    if mesh is None and active is not None:
        mesh = active[0]
    if mesh is None:
        abstract = jax.sharding.get_abstract_mesh()
        mesh = None if abstract.empty else abstract
    return mesh, rules


def _specs(mesh, rules, axis: str, q_shape, k_shape) -> tuple[P, P, P]:
    """PartitionSpecs for q, k/v and segment ids: T on `axis`, B and heads by the rules (never on `axis`)."""
    def drop_axis(entry):
        kept = tuple(a for a in ((entry,) if isinstance(entry, str) else (entry or ())) if a != axis)
        return kept if len(kept) > 1 else (kept[0] if kept else None)

    q_spec = rules_lib.logical_to_spec(("act_batch", None, "act_heads", None), q_shape, mesh, rules)
    k_spec = rules_lib.logical_to_spec(("act_batch", None, "act_kv_heads", None), k_shape, mesh, rules)
    batch, q_heads, k_heads = drop_axis(q_spec[0]), drop_axis(q_spec[2]), drop_axis(k_spec[2])
    if q_heads != k_heads:            # GQA groups stay whole on a shard only if q and kv heads split alike
        q_heads = k_heads = None
    return P(batch, axis, q_heads, None), P(batch, axis, k_heads, None), P(batch, axis)


def _validate(q, k, v, q_segment, kv_segment, impl: str, axis: str, mesh) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown context-parallel attention impl {impl!r}; expected one of {IMPLS}")
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B,T,N,H] and k, v [B,T,K,H] of one shape, got q {q.shape}, k {k.shape}, "
                         f"v {v.shape}")
    b, t, n, h = q.shape
    if k.shape[0] != b or k.shape[1] != t or k.shape[3] != h:
        raise ValueError(f"context-parallel attention is self-attention: k/v {k.shape} must match q {q.shape} "
                         f"in batch, length and head dim")
    if n % k.shape[2]:
        raise ValueError(f"{n} query heads are not a multiple of {k.shape[2]} kv heads")
    if q_segment.shape != (b, t) or kv_segment.shape != (b, t):
        raise ValueError(f"segment ids must be [B, T] = {(b, t)}, got q_segment {q_segment.shape}, "
                         f"kv_segment {kv_segment.shape}")
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has no axis {axis!r} (axes {mesh.axis_names})")
    size = mesh.shape[axis]
    if t % size:
        raise ValueError(f"sequence length T={t} is not divisible by the {axis!r} mesh axis of size {size}; "
                         f"pad the sequence to a multiple of {size}")


# ----------------------------------------------------------------------------------------------
# Per-shard math. Layout inside: q [B,K,G,T,H], k/v [B,S,K,H], segments [B,T]/[B,S], positions [T]/[S].

def _scores(q, k, q_pos, k_pos, qs, ks, scale, causal):
    """Masked fp32 scores [B,K,G,T,S] (masked entries _NEG) and the mask [B,1,1,T,S]."""
    mask = (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] > 0)
    if causal:
        mask &= k_pos[None, None, :] <= q_pos[None, :, None]
    mask = mask[:, None, None]
    s = jnp.einsum("BKGTH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask, s, _NEG), mask


def _ring_positions(axis: str, t_local: int, step):
    """(my shard index, source shard of the block held at `step`, my query positions, the block's positions)."""
    size = jax.lax.axis_size(axis)
    me = jax.lax.axis_index(axis)
    src = (me - step) % size
    local = jnp.arange(t_local)
    return me, src, me * t_local + local, src * t_local + local


def _shift(xs, axis: str):
    """Sends every array to the next shard along the ring (shard i -> i+1 mod P)."""
    size = jax.lax.axis_size(axis)
    perm = [(i, (i + 1) % size) for i in range(size)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis, perm), xs)


def _ring_forward(q, k, v, qs, ks, scale, causal, axis):
    """-> out [B,K,G,T,H] fp32 (0 on rows with no visible key), lse [B,K,G,T] fp32 (0 there)."""
    t_local = q.shape[3]
    size = jax.lax.axis_size(axis)
    m = jnp.full_like(q[..., 0], _NEG, dtype=jnp.float32)
    l = jnp.zeros_like(m)
    acc = jnp.zeros_like(q, dtype=jnp.float32)

    def attend(args):
        k, v, ks, m, l, acc, step = args
        _, _, q_pos, k_pos = _ring_positions(axis, t_local, step)
        s, mask = _scores(q, k, q_pos, k_pos, qs, ks, scale, causal)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

    def body(step, carry):
        k, v, ks, m, l, acc = carry
        me, src, _, _ = _ring_positions(axis, t_local, step)
        nxt = _shift((k, v, ks), axis)                    # issued first: the transfer overlaps the math
        needed = (src <= me) if causal else True
        m, l, acc = jax.lax.cond(needed, attend, lambda a: a[3:6], (k, v, ks, m, l, acc, step))
        return (*nxt, m, l, acc)

    # The last block needs no onward send: run P-1 steps with a shift, then the last one without.
    k, v, ks, m, l, acc = jax.lax.fori_loop(0, size - 1, body, (k, v, ks, m, l, acc))
    me, src, _, _ = _ring_positions(axis, t_local, size - 1)
    needed = (src <= me) if causal else True
    m, l, acc = jax.lax.cond(needed, attend, lambda a: a[3:6], (k, v, ks, m, l, acc, size - 1))
    seen = l > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return out, lse


def _ring_backward(q, k, v, qs, ks, out, lse, dout, scale, causal, axis):
    """Flash-attention backward as a ring: dq stays home; dk/dv ride with their k/v block for P hops."""
    t_local = q.shape[3]
    size = jax.lax.axis_size(axis)
    dout = dout.astype(jnp.float32)
    delta = jnp.sum(dout * out, axis=-1)                  # [B,K,G,T] = rowsum(dP * P)
    dq = jnp.zeros_like(q, dtype=jnp.float32)
    dk = jnp.zeros_like(k, dtype=jnp.float32)
    dv = jnp.zeros_like(v, dtype=jnp.float32)

    def attend(args):
        k, v, ks, dq, dk, dv, step = args
        _, _, q_pos, k_pos = _ring_positions(axis, t_local, step)
        s, mask = _scores(q, k, q_pos, k_pos, qs, ks, scale, causal)
        p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
        dv = dv + jnp.einsum("BKGTS,BKGTH->BSKH", p, dout)
        dp = jnp.einsum("BKGTH,BSKH->BKGTS", dout, v.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("BKGTS,BSKH->BKGTH", ds, k.astype(jnp.float32))
        dk = dk + jnp.einsum("BKGTS,BKGTH->BSKH", ds, q.astype(jnp.float32))
        return dq, dk, dv

    def body(step, carry):
        k, v, ks, dq, dk, dv = carry
        me, src, _, _ = _ring_positions(axis, t_local, step)
        needed = (src <= me) if causal else True
        dq, dk, dv = jax.lax.cond(needed, attend, lambda a: a[3:6], (k, v, ks, dq, dk, dv, step))
        k, v, ks, dk, dv = _shift((k, v, ks, dk, dv), axis)     # after P hops dk/dv are back home
        return k, v, ks, dq, dk, dv

    _, _, _, dq, dk, dv = jax.lax.fori_loop(0, size, body, (k, v, ks, dq, dk, dv))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _ring_attention(q, k, v, qs, ks, scale, causal, axis):
    return _ring_forward(q, k, v, qs, ks, scale, causal, axis)[0].astype(q.dtype)


def _ring_attention_fwd(q, k, v, qs, ks, scale, causal, axis):
    out, lse = _ring_forward(q, k, v, qs, ks, scale, causal, axis)
    return out.astype(q.dtype), (q, k, v, qs, ks, out, lse)


def _ring_attention_bwd(scale, causal, axis, residuals, dout):
    q, k, v, qs, ks, out, lse = residuals
    dq, dk, dv = _ring_backward(q, k, v, qs, ks, out, lse, dout, scale, causal, axis)
    return dq, dk, dv, None, None


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def _allgather_attention(q, k, v, qs, ks, scale, causal, axis):
    """Local queries [B,T/P,N,H] against all-gathered keys [B,T,K,H] with a global-position causal mask."""
    t_local = q.shape[1]
    gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)
    k, v, ks = gather(k), gather(v), gather(ks)
    q_index = jax.lax.axis_index(axis) * t_local + jnp.arange(t_local)
    kv_index = jnp.arange(k.shape[1])
    if causal:
        mask = causal_segment_mask(q_index[None], kv_index[None], qs, ks)
    else:
        mask = (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] > 0)
    return dot_product_attention(q, k, v, mask, scale)


# ----------------------------------------------------------------------------------------------
# Public entry point

def context_parallel_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment: jax.Array,
                               kv_segment: jax.Array, scale: float, *, causal: bool, mesh=None,
                               axis: str = "sequence", impl: str = "ring") -> jax.Array:
    """Self-attention with T split over mesh axis `axis` (see the module docstring). q [B,T,N,H],
    k/v [B,T,K,H], q_segment/kv_segment [B,T] int -> [B,T,N,H] in q's dtype. Call under jit (or eagerly)."""
    mesh, rules = _resolve_mesh(mesh)
    if impl not in IMPLS:
        raise ValueError(f"unknown context-parallel attention impl {impl!r}; expected one of {IMPLS}")
    if mesh is None or axis not in mesh.axis_names or mesh.shape[axis] == 1:
        if mesh is not None and axis not in mesh.axis_names:
            raise ValueError(f"mesh has no axis {axis!r} (axes {mesh.axis_names})")
        return blocked_attention(q, k, v, q_segment, kv_segment, scale, causal=causal)
    _validate(q, k, v, q_segment, kv_segment, impl, axis, mesh)
    q_spec, k_spec, seg_spec = _specs(mesh, rules, axis, q.shape, k.shape)

    def shard_fn(q, k, v, qs, ks):          # local blocks: q [B',T/P,N',H], k/v [B',T/P,K',H], segs [B',T/P]
        if impl == "allgather":
            return _allgather_attention(q, k, v, qs, ks, scale, causal, axis)
        b, t, n, h = q.shape
        kv_heads = k.shape[2]
        qx = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
        out = _ring_attention(qx, k, v, qs, ks, scale, causal, axis)
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)

    fn = jax.shard_map(shard_fn, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, seg_spec, seg_spec),
                       out_specs=q_spec)
    return fn(q, k, v, q_segment.astype(jnp.int32), kv_segment.astype(jnp.int32))
