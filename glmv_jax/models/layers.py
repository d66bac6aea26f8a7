"""Building blocks shared by the ViT and the decoder: norms, einsum projections, SwiGLU, attention.

Einsum legend (every einsum string in glmv_jax/models uses these letters):
  B batch            T query length      S key length        D model width
  N query heads      K kv heads          G heads per kv head H head dim
  F mlp width        E experts           C capacity/group    V vocab

Modules are Flax NNX and used functionally (glmv.py: build once, `nnx.split`, `nnx.merge` inside jit).
Every parameter carries logical axis names through `nnx.with_partitioning`; glmv_jax/sharding/rules.py
maps them to mesh axes. Parameters are kept in `param_dtype` (fp32) and cast to the compute dtype where
they are used. Norm statistics, softmax and rope tables are fp32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from glmv_jax.sharding import rules as rules_lib

Axes = tuple[str | None, ...]
INIT_STD = 0.02    # HF initializer_range


def param(rngs: nnx.Rngs | None, init: Callable, shape: Sequence[int], axes: Axes) -> nnx.Param:
    """An fp32 Param with logical axis names `axes` (one per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match the parameter shape {tuple(shape)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(nnx.with_partitioning(init, axes)(key, tuple(shape), jnp.float32))


def normal_init(std: float = INIT_STD) -> Callable:
    return nnx.initializers.normal(std)


class RMSNorm(nnx.Module):
    """HF Glm4vRMSNorm: fp32 `x * rsqrt(mean(x^2) + eps)`, cast to the input dtype, then times the scale."""

    def __init__(self, dim: int, eps: float, axis_name: str, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (axis_name,))

    def __call__(self, x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        """x [..., D] -> [..., D]; `scale` [D] replaces this norm's own (a decode layout's per-layer copy)."""
        scale = self.scale[...] if scale is None else scale
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm with affine scale and bias; statistics and affine in fp32, cast back at the end."""

    def __init__(self, dim: int, eps: float, axis_name: str, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (axis_name,))
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


def contract(x: jax.Array, kernel: jax.Array, n: int, preferred_element_type=None) -> jax.Array:
    """The last `n` axes of x against the first `n` of kernel: [*lead, *C] x [*C, *R] -> [*lead, *R], computed
    as one 2D matmul [M, K] @ [K, R'] (leading axes flattened). One contracting axis on each side keeps the
    backward dots transpose-free on XLA:CPU: as a 3D einsum, the weight gradient contracts two axes (B, T)
    and XLA copies the [B, T, F] cotangent into an [F, B*T] layout first (a strided, fused copy that cost
    ~15% of the CPU train step)."""
    lead, c_shape, r_shape = x.shape[:x.ndim - n], kernel.shape[:n], kernel.shape[n:]
    if x.shape[x.ndim - n:] != c_shape:
        raise ValueError(f"contract: x {x.shape} and kernel {kernel.shape} disagree on {n} contracted axes")
    k = math.prod(c_shape)
    y = jax.lax.dot_general(x.reshape(-1, k), kernel.reshape(k, -1), (((1,), (0,)), ((), ())),
                            preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *r_shape)


def matvec(x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
    """x [B, D] times a kernel in decode layout w [F, D] (the contracted axis minor) -> [B, F]. A one-token
    step streams every weight once, and XLA:CPU streams an [out, in] kernel ~1.5x faster than [in, out]."""
    return jnp.einsum("BD,FD->BF", x, w, preferred_element_type=preferred_element_type)


def _as_contraction(spec: str) -> int | None:
    """n when `spec` is "<lead><C>,<C><R>-><lead><R>" with n = len(C) contracted letters (lead may be "..."),
    i.e. a plain matmul over x's trailing and the kernel's leading axes; else None."""
    inputs, out = spec.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    for n in range(1, min(len(lhs), len(rhs)) + 1):
        c = lhs[len(lhs) - n:]
        if rhs[:n] == c and out == lhs[:len(lhs) - n] + rhs[n:] and not set(c) & set(out):
            return n
    return None


class Einsum(nnx.Module):
    """y = einsum(spec, x, kernel) (+ bias), kernel/bias cast to the compute dtype of `x`. Specs that are a
    plain matmul (e.g. "...D,DF->...F", "BTNH,NHD->BTD") run as `contract`."""

    def __init__(self, spec: str, kernel_shape: Sequence[int], kernel_axes: Axes, *,
                 bias_shape: Sequence[int] | None = None, bias_axes: Axes | None = None,
                 std: float = INIT_STD, rngs: nnx.Rngs | None = None):
        self.spec = spec
        self.contracted = _as_contraction(spec)
        self.kernel = param(rngs, normal_init(std), kernel_shape, kernel_axes)
        if bias_shape is not None:
            self.bias = param(rngs, nnx.initializers.zeros, bias_shape, bias_axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(x.dtype)
        y = jnp.einsum(self.spec, x, kernel) if self.contracted is None else contract(x, kernel, self.contracted)
        if hasattr(self, "bias"):
            y = y + self.bias[...].astype(x.dtype)
        return y

    def rows(self, dtype) -> jax.Array:
        """The kernel in decode layout for `matvec`: [outputs, inputs] (each side's axes flattened) in `dtype`.
        Only for plain-matmul specs."""
        if self.contracted is None:
            raise ValueError(f"Einsum {self.spec!r} is not a plain matmul; it has no matvec layout")
        kernel = self.kernel[...]
        return kernel.reshape(math.prod(kernel.shape[:self.contracted]), -1).T.astype(dtype)


class Kernel(nnx.Module):
    """A bare kernel for projections whose einsum is written at the call site (e.g. the fused ViT qkv)."""

    def __init__(self, shape: Sequence[int], axes: Axes, rngs: nnx.Rngs | None = None):
        self.kernel = param(rngs, normal_init(INIT_STD), shape, axes)


def linear(din: int, dout: int, axes: Axes, *, bias: bool = False, rngs: nnx.Rngs | None = None) -> Einsum:
    """A Linear over the last axis: kernel (din, dout) = HF weight.T."""
    return Einsum("...D,DF->...F", (din, dout), axes, bias_shape=(dout,) if bias else None,
                  bias_axes=axes[1:] if bias else None, rngs=rngs)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)), no biases. kernels gate/up (D, F), down (F, D)."""

    def __init__(self, dim: int, hidden: int, embed_axis: str, mlp_axis: str, rngs: nnx.Rngs | None = None):
        self.gate = linear(dim, hidden, (embed_axis, mlp_axis), rngs=rngs)
        self.up = linear(dim, hidden, (embed_axis, mlp_axis), rngs=rngs)
        self.down = linear(hidden, dim, (mlp_axis, embed_axis), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = checkpoint_name(self.gate(x), "mlp_gate")
        up = checkpoint_name(self.up(x), "mlp_up")
        return checkpoint_name(self.down(jax.nn.silu(gate) * up), "mlp_out")

    def decode_weights(self, dtype) -> dict:
        """The kernels in decode layout (`matvec`), in `dtype`: gate_up [2F, D] (gate rows, then up), down [D, F]."""
        return {"gate_up": jnp.concatenate([self.gate.rows(dtype), self.up.rows(dtype)]),
                "down": self.down.rows(dtype)}

    @staticmethod
    def decode(w: dict, x: jax.Array) -> jax.Array:
        """__call__ on x [B, D] with decode_weights `w` (gate and up in one matvec) -> [B, D]."""
        gate, up = jnp.split(matvec(x, w["gate_up"]), 2, axis=-1)
        return matvec(jax.nn.silu(gate) * up, w["down"])


# ----------------------------------------------------------------------------------------------
# Attention core. Masks are built from small per-token vectors ([B, T] / [B, S]) right where they are
# used, so XLA fuses them into the softmax instead of materializing a float [B, 1, T, S] mask.

def segment_mask(q_segment: jax.Array, kv_segment: jax.Array) -> jax.Array:
    """[B, T], [B, S] int -> [B, T, S] bool: same segment (block-diagonal ViT attention)."""
    return q_segment[:, :, None] == kv_segment[:, None, :]


def causal_segment_mask(q_index: jax.Array, kv_index: jax.Array, q_segment: jax.Array,
                        kv_segment: jax.Array) -> jax.Array:
    """Decoder mask [B, T, S]: key not after the query (by sequence index), same segment, key not padding.

    Segment 0 is padding; 1..k are the samples packed into a row (an attention_mask is a valid
    segment_ids with one sample). Indices are sequence slots."""
    causal = kv_index[:, None, :] <= q_index[:, :, None]
    return causal & (q_segment[:, :, None] == kv_segment[:, None, :]) & (kv_segment[:, None, :] > 0)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """The softmax attention every einsum path runs (full sequence, query blocks, KV-cache decode), GQA-grouped
    so kv is never repeated: q [..., G, T, H] (the G query heads of each kv head), k/v [..., S, H], mask bool
    broadcastable to [..., G, T, S] -> [..., G, T, H]; the leading axes (e.g. B, K) pair q with its kv head.

    Scores `(q k^T) * scale` and the softmax are fp32; probabilities are cast to the value dtype as HF's eager
    attention does. Fully masked rows (padding queries) give uniform weights, as in HF."""
    scores = jnp.einsum("...GTH,...SH->...GTS", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("...GTS,...SH->...GTH", probs, v)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          scale: float) -> jax.Array:
    """grouped_attention on the decoder layout: q [B,T,N,H], k/v [B,S,K,H], mask [B,T,S] bool -> [B,T,N,H]."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)      # [B, K, G, T, H]
    kg, vg = (a.transpose(0, 2, 1, 3) for a in (k, v))                              # [B, K, S, H]
    out = grouped_attention(qg, kg, vg, mask[:, None, None], scale)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment: jax.Array, kv_segment: jax.Array,
                      scale: float, *, causal: bool, block: int = 128, max_blocks: int = 16,
                      per_pair: bool | None = None) -> jax.Array:
    """Attention where query t sees key s iff q_segment[t] == kv_segment[s] > 0, and, when `causal`, s <= t
    by sequence slot (self-attention: keys in query order, T == S). q [B,T,N,H], k/v [B,S,K,H] (GQA, N = K*G),
    q_segment [B,T], kv_segment [B,S] int -> [B,T,N,H].

    The values of dot_product_attention with that mask (grouped_attention per block; a query that sees no
    key, i.e. padding, gets some finite average), computed in query blocks of `block` rows (at most
    `max_blocks` blocks) whose keys stop at the block's last query when causal, so the masked upper triangle
    is never computed. `per_pair` (default: on CPU) runs each (row, kv head) pair alone
    (lax.map), which keeps a block's [G, block, S] scores in cache instead of streaming a [B, K, G, T, S]
    array through memory, and checkpoints each pair (the backward recomputes its scores instead of stacking
    them for every pair); otherwise (accelerators) rows and heads stay batched.

    A loop over rows cannot be split by GSPMD: under a multi-device activation mesh (rules.activation_sharding
    or jax.set_mesh) the per-pair loop runs per device in jax.shard_map over the rows' (and heads') shards,
    so each device loops over its own rows instead of every device computing (and storing) all of them."""
    mesh_rules = _row_sharding_mesh()
    if per_pair is None:        # the platform the program is compiled for (an AOT target may not be this host)
        per_pair = (jax.default_backend() if mesh_rules is None else mesh_platform(mesh_rules[0])) == "cpu"
    if per_pair and mesh_rules is not None:
        return _per_device(functools.partial(_blocked_attention, scale=scale, causal=causal, block=block,
                                             max_blocks=max_blocks, per_pair=True),
                           q, k, v, q_segment, kv_segment, *mesh_rules)
    return _blocked_attention(q, k, v, q_segment, kv_segment, scale, causal, block, max_blocks, per_pair)


def _blocked_attention(q, k, v, q_segment, kv_segment, scale: float, causal: bool, block: int, max_blocks: int,
                       per_pair: bool) -> jax.Array:
    """blocked_attention on the arrays as given (no mesh handling)."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    block = max(block, -(-t // (8 * max_blocks)) * 8)     # at most max_blocks blocks, multiples of 8
    qx = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b * kv_heads, g, t, h)
    kx, vx = (a.transpose(0, 2, 1, 3).reshape(b * kv_heads, s, h) for a in (k, v))
    qs, ks = (jnp.repeat(a, kv_heads, axis=0) for a in (q_segment, kv_segment))

    def attend(qx, kx, vx, qs, ks):       # [X, G, T, H], [X, S, H] x2, [X, T], [X, S] -> [X, G, T, H]
        outs = []
        for lo in range(0, t, block):
            hi = min(t, lo + block)
            stop = hi if causal else s
            kb, vb, ksb = kx[:, :stop], vx[:, :stop], ks[:, :stop]
            mask = (qs[:, lo:hi, None] == ksb[:, None, :]) & (ksb[:, None, :] > 0)
            if causal:
                mask &= jnp.arange(stop)[None, None, :] <= jnp.arange(lo, hi)[None, :, None]
            outs.append(grouped_attention(qx[:, :, lo:hi], kb, vb, mask[:, None], scale))
        return jnp.concatenate(outs, axis=2)

    if per_pair:
        one = jax.checkpoint(lambda args: attend(*(a[None] for a in args))[0])
        out = jax.lax.map(one, (qx, kx, vx, qs, ks))
    else:
        out = attend(qx, kx, vx, qs, ks)
    return out.reshape(b, kv_heads, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _row_sharding_mesh():
    """(mesh, rules) splitting activations over several devices, or None: no such mesh, or already inside a
    shard_map (manual axes: the arrays are per-device blocks)."""
    abstract = jax.sharding.get_abstract_mesh()
    if not abstract.empty and any(t == jax.sharding.AxisType.Manual for t in abstract.axis_types):
        return None
    mesh, rules = rules_lib.current_mesh()
    return None if mesh is None or mesh.size == 1 else (mesh, rules)


def mesh_platform(mesh) -> str:
    """Platform of a Mesh's devices or an AbstractMesh's abstract device (this backend when unknown)."""
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh.devices.flat[0].platform
    return getattr(mesh.abstract_device, "platform", None) or jax.default_backend()


def _per_device(fn: Callable, q, k, v, q_segment, kv_segment, mesh, rules) -> jax.Array:
    """fn(q, k, v, q_segment, kv_segment) on each device's block: rows split as the rules split "act_batch",
    heads as "act_heads" / "act_kv_heads" when q and kv heads split alike (GQA groups stay whole)."""
    q_spec = rules_lib.logical_to_spec(("act_batch", None, "act_heads", None), q.shape, mesh, rules)
    k_spec = rules_lib.logical_to_spec(("act_batch", None, "act_kv_heads", None), k.shape, mesh, rules)
    rows = q_spec[0] if q_spec[0] == k_spec[0] else None
    heads = q_spec[2] if q_spec[2] == k_spec[2] else None
    if rows is None and heads is None:
        return fn(q, k, v, q_segment, kv_segment)
    qkv_spec, seg_spec = P(rows, None, heads, None), P(rows, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, seg_spec),
                         out_specs=qkv_spec)(q, k, v, q_segment, kv_segment)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, valid: jax.Array,
                     scale: float) -> jax.Array:
    """One decode step: grouped_attention of q [B, N, H] (one token per row) over a per-layer cache k/v
    [B, K, S, H] (the token's own key already written), valid [B, S] bool (the slots it may see) -> [B, N, H]."""
    b, n, h = q.shape
    kv_heads = k_cache.shape[1]
    q = q.reshape(b, kv_heads, n // kv_heads, 1, h)
    return grouped_attention(q, k_cache, v_cache, valid[:, None, None, None, :], scale).reshape(b, n, h)


# ----------------------------------------------------------------------------------------------
# Stacked layers: one module whose params carry a leading `layers` axis, applied by lax.scan or by an
# unrolled Python loop over the same arrays (identical math), with an optional remat policy.

def make_stack(factory: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """`count` layers built by `factory`, vmapped so every param gains a leading `layers` axis."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(r):
        return factory(r)

    return build(rngs)


REMAT_POLICIES = {   # config.remat name -> jax.checkpoint policy ("none": no remat); names match checkpoint_name tags
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_dots_except_mlp": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "attn_context", "attn_out"),
}


def remat_policy(name: str):
    """jax.checkpoint policy for config.remat (None: no remat)."""
    if name == "none":
        return None
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; expected none or one of {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


def run_stack(stack: nnx.Module, x: jax.Array, call: Callable[..., tuple[jax.Array, Any]], *, scan: bool,
              remat: str = "none", xs: Any = None) -> tuple[jax.Array, Any]:
    """Applies the stacked layers in order, (x, out_l) = call(layer_l, x) for l = 0..L-1, or
    call(layer_l, x, xs_l) when per-layer inputs `xs` (a pytree with a leading L axis, e.g. a KV
    cache) are given. Returns the final x and the per-layer outputs stacked on a leading axis."""
    graphdef, state = nnx.split(stack)

    def body(carry, layer_in):
        layer_state, extra = layer_in
        layer = nnx.merge(graphdef, layer_state)
        return call(layer, carry) if xs is None else call(layer, carry, extra)

    if remat != "none":
        body = jax.checkpoint(body, policy=remat_policy(remat))
    if scan:
        return jax.lax.scan(body, x, (state, xs))
    outs = []
    for i in range(jax.tree.leaves(state)[0].shape[0]):
        x, out = body(x, jax.tree.map(lambda a: a[i], (state, xs)))
        outs.append(out)
    return x, jax.tree.map(lambda *leaves: jnp.stack(leaves), *outs)
