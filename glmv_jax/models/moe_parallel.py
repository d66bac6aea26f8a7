"""Expert parallelism: the routed experts inside jax.shard_map over an `expert` mesh axis.

Experts are split over `expert_axis` (E/EP local experts per shard); tokens arrive sharded over
`token_axes`; the expert weights' D dim may be sharded over `fsdp_axis` (gathered inside, ZeRO-3 style)
and their F dim over `tensor_axis` (partial down-projections summed with psum). Routing happens outside
(plain GSPMD); only the expert FFN and the token exchange are manual. Strategies:

  "allgather"  exact and dropless (the "ring of experts"): every expert shard all-gathers the tokens of
               its expert group, runs its local experts with grouped matmuls, and reduce-scatters the
               fp32 partial mixes back. Works on every backend (the CPU-tested default).
  "capacity"   fixed-capacity all_to_all: each shard sends at most C = ceil(capacity_factor * n*K / E)
               token copies per expert (first come, in token order); the rest are dropped and counted.
  "ragged_a2a" dropless ragged all-to-all (sorted token copies exchanged with jax.lax.ragged_all_to_all,
               grouped matmuls on the receiver, sent back). XLA:CPU lacks ragged-all-to-all, so on CPU
               (ragged_collective="auto"/"emulated") the collective is an all-gather based emulation with the
               same semantics; that is what the CPU tests check. The native collective ("native") runs on
               GPU/TPU only and is NOT tested here.
Shapes: n tokens per shard, K experts per token, El local experts, EP expert-axis size, D width, F expert width.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from glmv_jax.models.moe_gmm import combine, grouped_ffn

STRATEGIES = ("allgather", "capacity", "ragged_a2a")


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    mesh: Mesh
    expert_axis: str = "expert"
    token_axes: tuple[str, ...] = ("data", "fsdp", "expert")   # axes sharding the token dim (absent ones skipped)
    fsdp_axis: str | None = None                                # expert weights' D dim sharded over it
    tensor_axis: str | None = None                              # expert weights' F dim sharded over it
    strategy: str = "allgather"
    capacity_factor: float = 1.25
    ragged_collective: str = "auto"                             # auto | native | emulated

    def validate(self, num_tokens: int, num_experts: int, d: int, f: int) -> None:
        names = self.mesh.axis_names
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown expert-parallel strategy {self.strategy!r}; expected one of {STRATEGIES}")
        if self.ragged_collective not in ("auto", "native", "emulated"):
            raise ValueError(f"unknown ragged_collective {self.ragged_collective!r}")
        for what, axis in (("expert_axis", self.expert_axis), ("fsdp_axis", self.fsdp_axis),
                           ("tensor_axis", self.tensor_axis)):
            if axis is not None and axis not in names:
                raise ValueError(f"{what} {axis!r} is not a mesh axis {names}")
        if self.tensor_axis in self.tokens():
            raise ValueError(f"tensor_axis {self.tensor_axis!r} cannot also shard the tokens")
        size = self.mesh.shape
        if num_experts % size[self.expert_axis]:
            raise ValueError(f"{num_experts} experts do not split over expert axis of size {size[self.expert_axis]}")
        shards = math.prod(size[a] for a in self.tokens())
        if num_tokens % shards:
            raise ValueError(f"{num_tokens} tokens do not split over token axes {self.tokens()} ({shards} shards)")
        if self.fsdp_axis and d % size[self.fsdp_axis]:
            raise ValueError(f"width {d} does not split over fsdp axis of size {size[self.fsdp_axis]}")
        if self.tensor_axis and f % size[self.tensor_axis]:
            raise ValueError(f"expert width {f} does not split over tensor axis of size {size[self.tensor_axis]}")
        if self.strategy != "allgather" and self.expert_axis not in self.tokens():
            raise ValueError(f"strategy {self.strategy!r} needs the tokens sharded over the expert axis "
                             f"(add {self.expert_axis!r} to token_axes)")
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive, got {self.capacity_factor}")

    def tokens(self) -> tuple[str, ...]:
        return tuple(a for a in self.token_axes if a in self.mesh.axis_names)


def _exclusive_cumsum(x, axis=0):
    return jnp.cumsum(x, axis=axis) - x


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """jax.lax.ragged_all_to_all semantics (one slice per peer) built from all_gather: works on XLA:CPU,
    costs P times the operand's traffic. operand [M, ...], output [R, ...], the four index arrays [P]."""
    del recv_sizes                                             # implied by the senders' sizes
    me = jax.lax.axis_index(axis_name)
    ops = jax.lax.all_gather(operand, axis_name)               # [P, M, ...]
    in_off = jax.lax.all_gather(input_offsets, axis_name)[:, me]
    sizes = jax.lax.all_gather(send_sizes, axis_name)[:, me]
    start = jax.lax.all_gather(output_offsets, axis_name)[:, me]
    j = jnp.arange(output.shape[0])
    hit = (j[:, None] >= start[None]) & (j[:, None] < (start + sizes)[None])   # [R, P]
    src = jnp.argmax(hit, axis=1)
    row = jnp.clip(in_off[src] + j - start[src], 0, operand.shape[0] - 1)
    got = ops[src, row]
    return jnp.where(hit.any(1).reshape((-1,) + (1,) * (output.ndim - 1)), got, output)


def _ragged_all_to_all(ep: ExpertParallel):
    native = ep.ragged_collective == "native" or (ep.ragged_collective == "auto" and jax.default_backend() != "cpu")
    return jax.lax.ragged_all_to_all if native else emulated_ragged_all_to_all


def _gather_fsdp(ep, gate, up, down):
    if ep.fsdp_axis is None:
        return gate, up, down
    g = lambda w, axis: jax.lax.all_gather(w, ep.fsdp_axis, axis=axis, tiled=True)
    return g(gate, 1), g(up, 1), g(down, 2)


def _allgather_body(ep, gmm, tile, x, w, idx, gate, up, down):
    el = gate.shape[0]
    gathered = ep.expert_axis in ep.tokens()
    if gathered:
        x, w, idx = (jax.lax.all_gather(v, ep.expert_axis, axis=0, tiled=True) for v in (x, w, idx))
    n, k = idx.shape
    local = idx - jax.lax.axis_index(ep.expert_axis) * el
    local = jnp.where((local >= 0) & (local < el), local, el).reshape(-1)
    rows = jnp.arange(n * k, dtype=jnp.int32) // k
    y = grouped_ffn(x, rows, local, gate, up, down, max_rows=n * min(k, el), impl=gmm, tile=tile)
    mix = combine(y, w)
    if gathered:
        return jax.lax.psum_scatter(mix, ep.expert_axis, scatter_dimension=0, tiled=True), 0
    return jax.lax.psum(mix, ep.expert_axis), 0


def _capacity_body(ep, gmm, tile, x, w, idx, gate, up, down):
    del gmm, tile
    el, d = gate.shape[0], x.shape[1]
    n_ep = jax.lax.axis_size(ep.expert_axis)
    e, (n, k) = el * n_ep, idx.shape
    m = n * k
    c = max(1, math.ceil(ep.capacity_factor * m / e))
    flat = idx.reshape(-1)
    starts = _exclusive_cumsum(jnp.zeros((e,), jnp.int32).at[flat].add(1))
    order = jnp.argsort(flat, stable=True)
    rank = jnp.zeros((m,), jnp.int32).at[order].set(jnp.arange(m, dtype=jnp.int32) - starts[flat[order]])
    keep = rank < c
    slot = jnp.where(keep, flat * c + rank, e * c)
    src = jnp.full((e * c,), n, jnp.int32).at[slot].set(jnp.arange(m, dtype=jnp.int32) // k, mode="drop")
    buf = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[src].reshape(n_ep, el * c, d)
    recv = jax.lax.all_to_all(buf, ep.expert_axis, 0, 0, tiled=True)            # [EP source, El*C, D]
    recv = recv.reshape(n_ep, el, c, d).transpose(1, 0, 2, 3).reshape(el, n_ep * c, d)
    dt = x.dtype
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", recv, gate.astype(dt))) * jnp.einsum("ecd,edf->ecf", recv,
                                                                                      up.astype(dt))
    out = jnp.einsum("ecf,efd->ecd", h, down.astype(dt))
    out = out.reshape(el, n_ep, c, d).transpose(1, 0, 2, 3).reshape(n_ep, el * c, d)
    back = jax.lax.all_to_all(out, ep.expert_axis, 0, 0, tiled=True).reshape(e * c, d)
    mix = combine(back.at[slot].get(mode="fill", fill_value=0), w)
    return mix, jnp.sum(~keep).astype(jnp.int32)


def _ragged_a2a_body(ep, gmm, tile, x, w, idx, gate, up, down):
    a2a = _ragged_all_to_all(ep)
    ax = ep.expert_axis
    el, d = gate.shape[0], x.shape[1]
    n_ep, me = jax.lax.axis_size(ax), jax.lax.axis_index(ax)
    e, (n, k) = el * n_ep, idx.shape
    m = n * k
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    xs = x[order // k]                                                            # [M, D] by expert = by shard
    counts = jnp.zeros((e,), jnp.int32).at[flat].add(1).reshape(n_ep, el)
    send = counts.sum(1)                                                          # [EP] copies per destination
    in_off = _exclusive_cumsum(send)
    all_send = jax.lax.all_gather(send, ax)                                       # [src, dst]
    out_off = _exclusive_cumsum(all_send, axis=0)[me]                             # my slice's place on each dst
    recv_sizes = all_send[:, me]
    recv_off = _exclusive_cumsum(recv_sizes)
    r = n_ep * n * min(k, el)
    recv = a2a(xs, jnp.zeros((r, d), x.dtype), in_off, send, out_off, recv_sizes, axis_name=ax)
    recv_counts = jax.lax.all_to_all(counts, ax, 0, 0, tiled=True)               # [src, El] for my experts
    row = jnp.arange(r, dtype=jnp.int32)
    src = jnp.searchsorted(jnp.cumsum(recv_sizes), row, side="right")
    src_c = jnp.minimum(src, n_ep - 1)
    pos = row - recv_off[src_c]
    local = jnp.sum(pos[:, None] >= jnp.cumsum(recv_counts, axis=1)[src_c], axis=1)
    group = jnp.where(src < n_ep, local, el).astype(jnp.int32)
    y = grouped_ffn(recv, row, group, gate, up, down, max_rows=r, impl=gmm, tile=tile)
    back_off = jax.lax.all_gather(in_off, ax)[:, me]                              # where it came from on src
    back = a2a(y, jnp.zeros((m, d), y.dtype), recv_off, recv_sizes, back_off, send, axis_name=ax)
    y_rows = jnp.zeros_like(back).at[order].set(back)
    return combine(y_rows, w), 0


_BODIES = {"allgather": _allgather_body, "capacity": _capacity_body, "ragged_a2a": _ragged_a2a_body}


def expert_parallel_mix(x, weights, experts, gate, up, down, ep: ExpertParallel, *, gmm="auto", tile=128):
    """x [N, D], weights/experts [N, K], gate/up [E, D, F], down [E, F, D] (global arrays; call under jit).
    Returns (mix [N, D] fp32, dropped token copies int32 scalar)."""
    e, d, f = gate.shape
    ep.validate(x.shape[0], e, d, f)
    tok = ep.tokens()
    tok_spec = P(tok if tok else None, None)
    w_in = P(ep.expert_axis, ep.fsdp_axis, ep.tensor_axis)
    w_out = P(ep.expert_axis, ep.tensor_axis, ep.fsdp_axis)
    body = _BODIES[ep.strategy]

    def shard_fn(x, w, idx, gate, up, down):
        gate, up, down = _gather_fsdp(ep, gate, up, down)
        mix, dropped = body(ep, gmm, tile, x, w, idx, gate, up, down)
        if ep.tensor_axis is not None:
            mix = jax.lax.psum(mix, ep.tensor_axis)
        dropped = jnp.asarray(dropped, jnp.int32)
        return mix, (jax.lax.psum(dropped, tok) if tok else dropped)

    fn = jax.shard_map(shard_fn, mesh=ep.mesh, in_specs=(tok_spec, tok_spec, tok_spec, w_in, w_in, w_out),
                       out_specs=(tok_spec, P()))
    return fn(x, weights, experts, gate, up, down)
