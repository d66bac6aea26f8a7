"""Dropless grouped expert FFN: rows sorted by expert, grouped matmuls, rows put back.

`grouped_ffn` is the one routine every dropless path uses (one device, all-gather expert parallelism,
ragged all-to-all): rows (token copies) carry an expert id in [0, G) or G ("not here"); they are laid
out sorted by expert (each group padded to whole pieces of the "tiled" backend), pushed through the
SwiGLU experts with grouped matmuls, and returned in the original row order (zeros for id G).

Grouped-matmul backends (`impl`):
  "ragged_dot": `jax.lax.ragged_dot`. On GPU and TPU it lowers to a real grouped matmul. On XLA:CPU it
                lowers to a dense masked product that costs G times the work and G*rows*D memory
                (measured: 47x a plain matmul at G=32), so it is not the CPU default.
  "tiled":      a loop over experts and, inside, over row pieces owned by that expert: whole tiles of
                `tile` rows, then at most one piece each of tile/2, tile/4, tile/8 rows (groups are
                padded to tile/8 only), with a custom VJP whose backward runs the same loops
                (dx = dy w^T; dw[g] = sum of x^T dy over g's pieces). Work = used pieces only. CPU default.
  "megablox":   TPU Pallas grouped matmul switch; not wired to a kernel here, maps to "ragged_dot"
                (which on TPU lowers to the native ragged-dot instruction).
Shapes: S source rows, R rows, G groups (local experts), D model width, F expert width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

GMM_IMPLS = ("auto", "ragged_dot", "tiled", "megablox")


def resolve_gmm_impl(impl: str) -> str:
    if impl not in GMM_IMPLS:
        raise ValueError(f"unknown grouped-matmul impl {impl!r}; expected one of {GMM_IMPLS}")
    if impl == "auto":
        return "tiled" if jax.default_backend() == "cpu" else "ragged_dot"
    return "ragged_dot" if impl == "megablox" else impl


def _vma(*xs) -> frozenset:
    """Mesh axes the values vary over inside shard_map (empty outside)."""
    mats = (getattr(jax.typeof(x), "mat", None) for x in xs)
    return frozenset().union(*(getattr(m, "varying", frozenset()) for m in mats))


def _to_varying(x, vma: frozenset):
    """Marks x as varying over `vma` (shard_map's check_vma wants equal vma on every operand)."""
    missing = tuple(sorted(vma - _vma(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def combine(y_rows, weights):
    """Expert outputs of the token copies [N*K, D] (compute dtype) times fp32 weights [N, K], summed over
    the K copies in fp32 -> [N, D] fp32 (HF grouped_mm numerics)."""
    n, k = weights.shape
    return (y_rows.reshape(n, k, -1).astype(jnp.float32) * weights[..., None]).sum(axis=1)


def _round_up(n, m):
    return (n + m - 1) // m * m


def _exclusive_cumsum(x):
    return jnp.cumsum(x) - x


# ----------------------------------------------------------------------------------------------
# Tiled grouped matmul (custom VJP). Pieces come in sizes `sizes` = (tile, tile/2, ...) (tile_sizes);
# group g owns counts[j, g] consecutive pieces of sizes[j] rows from row starts[j, g], and each piece's
# output rows are its input rows times w[g]. The loops run group-major: w[g] is sliced once per group and
# dw[g] is accumulated in a loop carry over the group's pieces, written once per group.

def tile_sizes(tile: int, levels: int = 4) -> tuple[int, ...]:
    """Piece sizes for `tile`: tile, tile/2, ... while even, at most `levels` of them. A group padded to
    a multiple of the smallest is whole tiles plus at most one piece of each smaller size (binary digits
    of the remainder), so padding is < sizes[-1] rows per group instead of < tile."""
    sizes = [tile]
    while len(sizes) < levels and sizes[-1] % 2 == 0:
        sizes.append(sizes[-1] // 2)
    return tuple(sizes)


def _pieces(starts, counts, sizes, g, body, carry):
    """Runs body(row0, size, carry) over group g's pieces, largest size first (fixed order)."""
    for j, size in enumerate(sizes):
        step = lambda i, c, j=j, size=size: body(starts[j, g] + i * size, size, c)
        carry = jax.lax.fori_loop(0, counts[j, g], step, carry)      # a while loop: the count is traced
    return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def tiled_gmm(x, w, starts, counts, sizes: tuple[int, ...]):
    """x [Rp, Din], w [G, Din, Dout] (same dtype), starts / counts [len(sizes), G] int32 (the pieces, see
    above; rows no piece covers are left zero) -> [Rp, Dout] in x.dtype, fp32 accumulation."""
    return _tiled_fwd(x, w, starts, counts, sizes)[0]


def _tiled_fwd(x, w, starts, counts, sizes):
    def group(g, out):
        w_g = w[g]

        def piece(r0, size, out):
            rows = jax.lax.dynamic_slice_in_dim(x, r0, size, axis=0)
            y = jnp.dot(rows, w_g, preferred_element_type=jnp.float32).astype(x.dtype)
            return jax.lax.dynamic_update_slice_in_dim(out, y, r0, axis=0)
        return _pieces(starts, counts, sizes, g, piece, out)

    vma = _vma(x, w, starts, counts)
    out = jax.lax.fori_loop(0, w.shape[0], group, _to_varying(jnp.zeros((x.shape[0], w.shape[2]), x.dtype), vma))
    return out, (x, w, starts, counts)


def _tiled_bwd(sizes, res, dy):
    x, w, starts, counts = res
    vma = _vma(x, w, starts, counts)
    dy = _to_varying(dy.astype(x.dtype), vma)

    def group(dx, g):
        w_g = w[g]

        def piece(r0, size, carry):
            dx, dw_g = carry
            rows = jax.lax.dynamic_slice_in_dim(x, r0, size, axis=0)
            drows = jax.lax.dynamic_slice_in_dim(dy, r0, size, axis=0)
            dx_t = jnp.dot(drows, w_g.T, preferred_element_type=jnp.float32).astype(x.dtype)
            dx = jax.lax.dynamic_update_slice_in_dim(dx, dx_t, r0, axis=0)
            return dx, dw_g + jnp.dot(rows.T, drows, preferred_element_type=jnp.float32)

        dw_g = _to_varying(jnp.zeros(w.shape[1:], jnp.float32), vma)
        dx, dw_g = _pieces(starts, counts, sizes, g, piece, (dx, dw_g))
        return dx, dw_g.astype(w.dtype)

    dx, dw = jax.lax.scan(group, _to_varying(jnp.zeros_like(x), vma), jnp.arange(w.shape[0]))
    return dx, dw, None, None


tiled_gmm.defvjp(_tiled_fwd, _tiled_bwd)


# ----------------------------------------------------------------------------------------------
# Sorted, padded layout and the grouped SwiGLU FFN.

def _layout(row_group, num_groups: int, max_rows: int, sizes: tuple[int, ...]):
    """Sorted layout of rows by group, each group padded to a multiple of sizes[-1]. Returns (dest [R]:
    slot of each row, Rp for id G rows; counts [G] (rows per group); starts / pieces [len(sizes), G]: the
    tiled_gmm pieces; Rp)."""
    r, unit = row_group.shape[0], sizes[-1]
    counts = jnp.zeros((num_groups + 1,), jnp.int32).at[row_group].add(1)
    starts = _exclusive_cumsum(counts)
    counts = counts[:num_groups]
    padded = _round_up(counts, unit)
    padded_starts = _exclusive_cumsum(padded)
    rp = max(_round_up(max_rows + min(num_groups, max_rows) * (unit - 1), unit), sizes[0])   # padding only in non-empty groups
    order = jnp.argsort(row_group, stable=True)
    group_sorted = row_group[order]
    rank = jnp.arange(r, dtype=jnp.int32) - starts[group_sorted]
    here = group_sorted < num_groups
    dest_sorted = jnp.where(here, padded_starts[jnp.minimum(group_sorted, num_groups - 1)] + rank, rp)
    dest = jnp.zeros((r,), jnp.int32).at[order].set(dest_sorted.astype(jnp.int32))
    pieces = [padded // sizes[0]] + [(padded % sizes[0]) // size % 2 for size in sizes[1:]]
    piece_starts, row0 = [], padded_starts
    for size, n in zip(sizes, pieces):
        piece_starts.append(row0)
        row0 = row0 + n * size
    return dest, counts, jnp.stack(piece_starts).astype(jnp.int32), jnp.stack(pieces).astype(jnp.int32), rp


def grouped_ffn(x_src, row_src, row_group, gate, up, down, *, max_rows: int, impl: str = "auto",
                tile: int = 128):
    """SwiGLU experts on rows. x_src [S, D]; row r reads x_src[row_src[r]] and goes to expert
    row_group[r] in [0, G], G meaning "not on this shard" (output zero). At most `max_rows` rows may have
    an id < G (a static bound: the buffer size). gate/up [G, D, F], down [G, F, D] (cast to x_src.dtype).
    Returns [R, D] in x_src.dtype."""
    impl = resolve_gmm_impl(impl)
    num_groups = gate.shape[0]
    sizes = tile_sizes(tile) if impl == "tiled" else (1,)
    dest, counts, starts, pieces, rp = _layout(row_group, num_groups, max_rows, sizes)
    s, dtype = x_src.shape[0], x_src.dtype
    slot_src = jnp.full((rp,), s, jnp.int32).at[dest].set(row_src.astype(jnp.int32), mode="drop")
    xp = jnp.concatenate([x_src, jnp.zeros((1, x_src.shape[1]), dtype)], axis=0)[slot_src]   # [Rp, D]

    vma = _vma(xp, gate, up, down, starts, pieces, counts)
    xp, gate, up, down, starts, pieces, counts = (_to_varying(v, vma) for v in
                                                  (xp, gate, up, down, starts, pieces, counts))
    if impl == "tiled":
        mm = lambda a, w: tiled_gmm(a, w.astype(dtype), starts, pieces, sizes)
    else:
        mm = lambda a, w: jax.lax.ragged_dot(a, w.astype(dtype), counts,
                                             preferred_element_type=jnp.float32).astype(dtype)
    h = jax.nn.silu(mm(xp, gate)) * mm(xp, up)
    yp = mm(h, down)                                                                       # [Rp, D]
    return yp.at[dest].get(mode="fill", fill_value=0)
