"""Context parallelism: causal self-attention with the sequence split over a mesh axis ("sequence").

    out = context_parallel_attention(q, k, v, q_segment, kv_segment, scale, causal=True)

q [B,T,N,H], k/v [B,T,K,H] (GQA, N = K*G), segment ids [B,T] int (0 = padding; 1..k the samples packed
in a row), keys in query order (self-attention). Query t sees key s iff q_segment[t] == kv_segment[s] > 0
and, when causal, s <= t by global sequence slot. The values are those of
glmv_jax.models.layers.blocked_attention on one device, computed inside `jax.shard_map` with T split in
P contiguous shards of T/P tokens (shard i holds global slots i*T/P .. (i+1)*T/P - 1):

  impl="ring"       k/v/segment blocks travel around the axis by `ppermute` while every shard keeps its
                    queries; an online softmax (fp32 running max, sum and output) takes one block per step,
                    and (query chunk, key chunk) pairs wholly in the future are skipped (`lax.cond`). A custom
                    VJP runs the backward as a second ring (dk/dv accumulators travel with their k/v block and
                    arrive home after P hops), so memory stays O(T/P) per shard: no [T, T] scores, no
                    gathered k/v.
  impl="allgather"  all-gathers k/v/segments and attends locally to all T keys with the causal mask
                    (simple; memory O(T) per shard, scores [T/P, T]); gradients by autodiff.

Ring layouts: "contiguous" (default) computes on the shards as they are; causal work is unbalanced (shard
P-1 does P blocks, shard 0 one, so skipping saves work but not wall time). "zigzag" first moves the tokens
(two ppermutes of q/k/v/segments, two back for the output) so shard i holds chunks i and 2P-1-i of 2P
(T divisible by 2P): every shard then does the same causal work, 2P+1 chunk pairs of T/2P squared instead of
up to 4P for the contiguous layout's last shard. Inputs and output are in natural order either way.

Padding queries (segment 0) see no key: the ring gives 0 there, all-gather a finite average (like the
single-device reference, whose value there is arbitrary). Compare outputs on non-padding rows only.

Sharding: the batch dimension stays split over the rules' `act_batch` axes and heads over the rules'
`act_heads`/`act_kv_heads` axes (only when both N and K divide; otherwise heads are replicated inside the
map). Mesh axes that do not divide a dimension are dropped for it, as in rules.logical_to_spec. The mesh
is `mesh`, else the one of `rules.activation_sharding`, else the `jax.set_mesh` mesh; with no mesh, or
an `axis` of size 1, this is plain `blocked_attention`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from glmv_jax.models.layers import blocked_attention, causal_segment_mask, dot_product_attention
from glmv_jax.sharding import rules as rules_lib

IMPLS = ("ring", "allgather")
LAYOUTS = ("contiguous", "zigzag")
_NEG = float(jnp.finfo(jnp.float32).min)


# ----------------------------------------------------------------------------------------------
# Mesh and partition specs

def _resolve_mesh(mesh) -> tuple[Any, Any]:
    """(mesh or None, rules): the given mesh, else activation_sharding's, else jax.set_mesh's."""
    current, rules = rules_lib.current_mesh()
    return (current if mesh is None else mesh), rules


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


def _check_options(impl: str, layout: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown context-parallel attention impl {impl!r}; expected one of {IMPLS}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown context-parallel layout {layout!r}; expected one of {LAYOUTS}")
    if impl == "allgather" and layout != "contiguous":
        raise ValueError("layout='zigzag' is a ring option; impl='allgather' already balances causal work")


def _validate(q, k, v, q_segment, kv_segment, axis: str, layout: str, mesh) -> None:
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
    if layout == "zigzag" and t % (2 * size):
        raise ValueError(f"layout='zigzag' needs T={t} divisible by 2 x the {axis!r} axis size ({2 * size})")


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


def _tiled(x, axis: int, n: int):
    """[..., T, ...] (T at `axis`) -> [n, ..., T/n, ...]: n query tiles on a leading axis."""
    x = x.reshape(x.shape[:axis] + (n, x.shape[axis] // n) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _untiled(x, axis: int):
    """Inverse of _tiled."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _tile_count(rows: int, block: int) -> int:
    """Fewest query tiles of at most `block` rows that split `rows` evenly."""
    n = -(-rows // block)
    while rows % n:
        n += 1
    return n


def _pair_forward(q, qs, q_pos, k, v, ks, k_pos, state, scale, causal, block):
    """Online-softmax update of one query chunk's state (m, l [B,K,G,T], acc [B,K,G,T,H] fp32) with one key
    chunk, in query tiles of at most `block` rows (scores [B,K,G,block,S] at a time)."""
    def tile(args):
        q, qs, q_pos, m, l, acc = args
        s, mask = _scores(q, k, q_pos, k_pos, qs, ks, scale, causal)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

    args, axes = (q, qs, q_pos, *state), (3, 1, 0, 3, 3, 3)
    n = _tile_count(q.shape[3], block)
    if n == 1:
        return tile(args)
    out = jax.lax.map(tile, tuple(_tiled(x, ax, n) for x, ax in zip(args, axes)))
    return tuple(_untiled(x, 3) for x in out)


def _pair_backward(q, qs, q_pos, dout, lse, delta, k, v, ks, k_pos, grads, scale, causal, block):
    """Adds one (query chunk, key chunk) pair's contribution to (dq [B,K,G,T,H], dk, dv [B,S,K,H]) fp32,
    in query tiles of at most `block` rows (dk/dv summed over the tiles)."""
    dq, dk, dv = grads

    def tile(carry, args):
        dk, dv = carry
        q, qs, q_pos, dout, lse, delta, dq = args
        s, mask = _scores(q, k, q_pos, k_pos, qs, ks, scale, causal)
        p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
        dv = dv + jnp.einsum("BKGTS,BKGTH->BSKH", p, dout)
        dp = jnp.einsum("BKGTH,BSKH->BKGTS", dout, v.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("BKGTS,BSKH->BKGTH", ds, k.astype(jnp.float32))
        dk = dk + jnp.einsum("BKGTS,BKGTH->BSKH", ds, q.astype(jnp.float32))
        return (dk, dv), dq

    args, axes = (q, qs, q_pos, dout, lse, delta, dq), (3, 1, 0, 3, 3, 3, 3)
    n = _tile_count(q.shape[3], block)
    if n == 1:
        (dk, dv), dq = tile((dk, dv), args)
        return dq, dk, dv
    (dk, dv), dq = jax.lax.scan(tile, (dk, dv), tuple(_tiled(x, ax, n) for x, ax in zip(args, axes)))
    return _untiled(dq, 3), dk, dv


def _chunk_ids(shard, size: int, layout: str) -> list:
    """Global ids of the sequence chunks shard `shard` holds (a chunk is T/P tokens when contiguous, T/(2P)
    when zig-zag): contiguous [shard]; zig-zag [shard, 2P-1-shard] (an early and a late chunk, so every
    shard has the same causal work)."""
    return [shard] if layout == "contiguous" else [shard, 2 * size - 1 - shard]


def _shift(xs, axis: str):
    """Sends every array to the next shard along the ring (shard i -> i+1 mod P)."""
    size = jax.lax.axis_size(axis)
    perm = [(i, (i + 1) % size) for i in range(size)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis, perm), xs)


def _zigzag(x, axis: str, inverse: bool = False):
    """Reorders local blocks [B, T/P, ...] between the contiguous layout (shard j holds chunks 2j, 2j+1 of
    2P) and the zig-zag one (shard i holds chunks i, 2P-1-i), two ppermutes each way."""
    size = jax.lax.axis_size(axis)
    even = jax.lax.axis_index(axis) % 2 == 0
    owner = lambda chunk: chunk if chunk < size else 2 * size - 1 - chunk      # zig-zag shard of a chunk
    first, second = jnp.split(x, 2, axis=1)
    if not inverse:       # contiguous lo = chunk 2j, hi = 2j+1 -> their zig-zag owners
        from_lo = jax.lax.ppermute(first, axis, [(j, owner(2 * j)) for j in range(size)])
        from_hi = jax.lax.ppermute(second, axis, [(j, owner(2 * j + 1)) for j in range(size)])
        return jnp.concatenate([jnp.where(even, from_lo, from_hi), jnp.where(even, from_hi, from_lo)], axis=1)
    even_chunk = jnp.where(even, first, second)        # zig-zag shard i holds one even and one odd chunk
    odd_chunk = jnp.where(even, second, first)
    even_id = lambda i: i if i % 2 == 0 else 2 * size - 1 - i
    odd_id = lambda i: 2 * size - 1 - i if i % 2 == 0 else i
    lo = jax.lax.ppermute(even_chunk, axis, [(i, even_id(i) // 2) for i in range(size)])
    hi = jax.lax.ppermute(odd_chunk, axis, [(i, odd_id(i) // 2) for i in range(size)])
    return jnp.concatenate([lo, hi], axis=1)


def _pairs(q_ids, k_ids, causal):
    """(query chunk a, key chunk b, needed) for every pair; a pair wholly in the future is not needed."""
    return [(a, b, (kb <= qa) if causal else None) for a, qa in enumerate(q_ids) for b, kb in enumerate(k_ids)]


def _maybe(needed, fn, operand):
    """fn(operand) where `needed` (a traced bool, or None: always), else operand unchanged (math skipped)."""
    return fn(operand) if needed is None else jax.lax.cond(needed, fn, lambda x: x, operand)


def _ring_forward(q, k, v, qs, ks, scale, causal, axis, layout, block):
    """-> out [B,K,G,T,H] fp32 (0 on rows with no visible key), lse [B,K,G,T] fp32 (0 there)."""
    size, me = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
    nc = len(_chunk_ids(0, size, layout))
    chunk = q.shape[3] // nc
    local = jnp.arange(chunk)
    qc, qsc, q_ids = jnp.split(q, nc, axis=3), jnp.split(qs, nc, axis=1), _chunk_ids(me, size, layout)
    state = [(jnp.full_like(qa[..., 0], _NEG, dtype=jnp.float32), jnp.zeros_like(qa[..., 0], dtype=jnp.float32),
              jnp.zeros_like(qa, dtype=jnp.float32)) for qa in qc]

    def attend(k, v, ks, state, step):
        k_ids = _chunk_ids((me - step) % size, size, layout)
        kc, vc, ksc = (jnp.split(x, nc, axis=1) for x in (k, v, ks))
        state = list(state)
        for a, b, needed in _pairs(q_ids, k_ids, causal):
            update = lambda st, a=a, b=b: _pair_forward(qc[a], qsc[a], q_ids[a] * chunk + local, kc[b], vc[b],
                                                        ksc[b], k_ids[b] * chunk + local, st, scale, causal, block)
            state[a] = _maybe(needed, update, state[a])
        return state

    def body(step, carry):
        k, v, ks, state = carry
        nxt = _shift((k, v, ks), axis)                    # issued first: the transfer overlaps the math
        return (*nxt, attend(k, v, ks, state, step))

    # The last block needs no onward send: P-1 steps with a shift, then the last one without.
    k, v, ks, state = jax.lax.fori_loop(0, size - 1, body, (k, v, ks, state))
    state = attend(k, v, ks, state, size - 1)
    outs, lses = [], []
    for m, l, acc in state:
        seen = l > 0
        safe = jnp.where(seen, l, 1.0)
        outs.append(jnp.where(seen[..., None], acc / safe[..., None], 0.0))
        lses.append(jnp.where(seen, m + jnp.log(safe), 0.0))
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


def _ring_backward(q, k, v, qs, ks, out, lse, dout, scale, causal, axis, layout, block):
    """Flash-attention backward as a ring: dq stays home; dk/dv ride with their k/v block for P hops."""
    size, me = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
    nc = len(_chunk_ids(0, size, layout))
    chunk = q.shape[3] // nc
    local = jnp.arange(chunk)
    dout = dout.astype(jnp.float32)
    delta = jnp.sum(dout * out.astype(jnp.float32), axis=-1)     # [B,K,G,T] = rowsum(dP * P)
    split_q = lambda x: jnp.split(x, nc, axis=3)
    qc, doc, lsec, deltac = split_q(q), split_q(dout), split_q(lse), split_q(delta)
    qsc, q_ids = jnp.split(qs, nc, axis=1), _chunk_ids(me, size, layout)
    dq = [jnp.zeros_like(qa, dtype=jnp.float32) for qa in qc]
    dk, dv = jnp.zeros_like(k, dtype=jnp.float32), jnp.zeros_like(v, dtype=jnp.float32)

    def body(step, carry):
        k, v, ks, dk, dv, dq = carry
        k_ids = _chunk_ids((me - step) % size, size, layout)
        kc, vc, ksc, dkc, dvc = (jnp.split(x, nc, axis=1) for x in (k, v, ks, dk, dv))
        dq = list(dq)
        for a, b, needed in _pairs(q_ids, k_ids, causal):
            grads = lambda st, a=a, b=b: _pair_backward(qc[a], qsc[a], q_ids[a] * chunk + local, doc[a], lsec[a],
                                                        deltac[a], kc[b], vc[b], ksc[b], k_ids[b] * chunk + local,
                                                        st, scale, causal, block)
            dq[a], dkc[b], dvc[b] = _maybe(needed, grads, (dq[a], dkc[b], dvc[b]))
        dk, dv = jnp.concatenate(dkc, axis=1), jnp.concatenate(dvc, axis=1)
        k, v, ks, dk, dv = _shift((k, v, ks, dk, dv), axis)     # after P hops dk/dv are back home
        return k, v, ks, dk, dv, dq

    _, _, _, dk, dv, dq = jax.lax.fori_loop(0, size, body, (k, v, ks, dk, dv, dq))
    return jnp.concatenate(dq, axis=3).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _ring_attention(q, k, v, qs, ks, scale, causal, axis, layout, block):
    """q [B,K,G,T,H], k/v [B,S,K,H] local blocks -> [B,K,G,T,H] in q's dtype."""
    return _ring_forward(q, k, v, qs, ks, scale, causal, axis, layout, block)[0].astype(q.dtype)


def _ring_attention_fwd(q, k, v, qs, ks, scale, causal, axis, layout, block):
    out, lse = _ring_forward(q, k, v, qs, ks, scale, causal, axis, layout, block)
    out = out.astype(q.dtype)
    return out, (q, k, v, qs, ks, out, lse)


def _ring_attention_bwd(scale, causal, axis, layout, block, residuals, dout):
    q, k, v, qs, ks, out, lse = residuals
    dq, dk, dv = _ring_backward(q, k, v, qs, ks, out, lse, dout, scale, causal, axis, layout, block)
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
                               axis: str = "sequence", impl: str = "ring", layout: str = "contiguous",
                               block: int = 512) -> jax.Array:
    """Self-attention with T split over mesh axis `axis` (see the module docstring). q [B,T,N,H],
    k/v [B,T,K,H], q_segment/kv_segment [B,T] int -> [B,T,N,H] in q's dtype. Call under jit (or eagerly).
    Inputs and output are in natural (contiguous) order whatever `layout` the ring computes in. `block`: the
    ring's query tile (scores [B,K,G,block,T/P] at a time; fewest tiles of at most `block` rows)."""
    _check_options(impl, layout)
    if block < 1:
        raise ValueError(f"block must be a positive number of query rows, got {block}")
    mesh, rules = _resolve_mesh(mesh)
    if mesh is not None and axis not in mesh.axis_names:
        raise ValueError(f"mesh has no axis {axis!r} (axes {mesh.axis_names})")
    if mesh is None or mesh.shape[axis] == 1:
        return blocked_attention(q, k, v, q_segment, kv_segment, scale, causal=causal)
    _validate(q, k, v, q_segment, kv_segment, axis, layout, mesh)
    q_spec, k_spec, seg_spec = _specs(mesh, rules, axis, q.shape, k.shape)

    def shard_fn(q, k, v, qs, ks):          # local blocks: q [B',T/P,N',H], k/v [B',T/P,K',H], segs [B',T/P]
        if impl == "allgather":
            return _allgather_attention(q, k, v, qs, ks, scale, causal, axis)
        if layout == "zigzag":
            q, k, v, qs, ks = (_zigzag(x, axis) for x in (q, k, v, qs, ks))
        b, t, n, h = q.shape
        kv_heads = k.shape[2]
        qx = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
        out = _ring_attention(qx, k, v, qs, ks, scale, causal, axis, layout, block)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
        return _zigzag(out, axis, inverse=True) if layout == "zigzag" else out

    fn = jax.shard_map(shard_fn, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, seg_spec, seg_spec),
                       out_specs=q_spec)
    return fn(q, k, v, q_segment.astype(jnp.int32), kv_segment.astype(jnp.int32))
