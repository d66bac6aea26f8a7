"""Self-attention behind one switch (`ModelConfig.attention`): the decoder's training/prefill path and the
ViT's per-frame attention call `attend(..., impl=config.attention)`.

Masking contract (what every implementation computes on real rows): query t sees key s iff
q_segment[t] == kv_segment[s] > 0 and, when `causal`, s <= t by sequence slot. Segment 0 is decoder
padding; the ViT uses -1 for empty frame slots (and 0 for padding rows when it runs without frames).
Rows whose segment is <= 0 are padding: their outputs are finite but implementation-defined (the fused
kernels let a padding row attend to its own padding segment, so no softmax row is ever empty).

Implementations:
  "einsum"    layers.blocked_attention: query blocks, causal upper triangle skipped, fp32 scores/softmax.
              The reference and the CPU default. ("xla", the field's old name for it, still means this.)
  "xla_sdpa"  jax.nn.dot_product_attention(implementation="xla") with a [B, 1, T, S] segment mask and
              is_causal: the XLA twin of the cuDNN call (runs everywhere; materializes [B, N, T, S] scores).
  "cudnn"     jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention on NVIDIA GPUs.
              Restrictions (checked up front by `cudnn_problems`, each raising a clear error): a GPU
              backend; q/k/v in bfloat16 or float16 (not fp32); head dim a multiple of 8 and <= 128
              (<= 256 on Hopper and later); T and S even (the segment mask is passed to cuDNN as an additive
              bias, and cuDNN's bias backward needs even lengths). The mask bias is [B, 1, T, S] in memory.
  "splash"    Pallas TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention): SegmentIds
              plus a static causal or full mask, GQA natively (kv head of query head n is n // G). T and S
              are padded to the kernel block (a multiple of 128) with a segment id no real token uses.
              Off TPU the kernel runs in Pallas interpret mode (correct, slow: tests only). Under an active
              mesh it runs per device in jax.shard_map (batch and heads split as the activation rules say).
  "auto"      einsum on CPU, cudnn on GPU when `cudnn_problems` finds none (else einsum), splash on TPU
              when the head dim is a multiple of 128 (every GLM-V preset; else einsum: splash kernels with
              narrower heads were not checked on a TPU here).

Context parallelism: when the active activation-sharding mesh (sharding/rules.py `activation_sharding`)
has a "sequence" axis larger than 1 and the attention is causal, `attend` hands the call to
glmv_jax.models.context_parallel.context_parallel_attention whatever `impl` says.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from glmv_jax.models import context_parallel
from glmv_jax.models.layers import blocked_attention, mesh_platform
from glmv_jax.sharding import rules
from glmv_jax.sharding.rules import logical_to_spec

IMPLEMENTATIONS = ("auto", "einsum", "xla_sdpa", "cudnn", "splash")
ALIASES = {"xla": "einsum"}          # the config field's earlier name for the einsum reference
ACCEPTED = IMPLEMENTATIONS + tuple(ALIASES)
SPLASH_BLOCK = 128                   # splash tile: lengths are padded to a multiple (the TPU lane width)
SPLASH_HEAD_ALIGN = 128              # "auto" uses splash on TPU only for lane-aligned head dims (GLM-V: 128)
_SPLASH_PAD_SEGMENT = -(2 ** 31)     # segment id of the alignment padding (no real or padding token uses it)


def check_impl(impl: str) -> str:
    """The canonical name of `impl` (aliases mapped), or a ValueError naming the accepted ones."""
    if impl not in ACCEPTED:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of {ACCEPTED}")
    return ALIASES.get(impl, impl)


def resolve(impl: str, q: jax.Array | None = None, k: jax.Array | None = None,
            backend: str | None = None) -> str:
    """The implementation `impl` runs as: "auto" picks by backend (cpu -> einsum, gpu -> cudnn when q/k
    meet its restrictions, else einsum, tpu -> splash when the head dim is a multiple of 128, else einsum);
    other names map to themselves (aliases resolved)."""
    impl = check_impl(impl)
    if impl != "auto":
        return impl
    if backend is None:      # the active mesh's platform (an AOT compile for a TPU topology runs on a CPU host)
        mesh, _ = _active_mesh()
        backend = jax.default_backend() if mesh is None else mesh_platform(mesh)
    if backend == "tpu":
        return "splash" if q is None or q.shape[-1] % SPLASH_HEAD_ALIGN == 0 else "einsum"
    if backend in ("gpu", "cuda", "rocm") and q is not None and not cudnn_problems(q, k, backend=backend):
        return "cudnn"
    return "einsum"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_segment: jax.Array, kv_segment: jax.Array, scale: float,
           *, causal: bool, impl: str = "auto", block: int = 128) -> jax.Array:
    """q [B,T,N,H], k/v [B,S,K,H] (GQA, N = K*G), q_segment [B,T], kv_segment [B,S] int -> [B,T,N,H].

    Query t sees key s iff the segments are equal and > 0 (and s <= t when `causal`); see the module
    docstring for the implementations. `block` is the einsum path's query block."""
    impl = resolve(impl, q, k)
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention wants q [B,T,N,H] and k/v [B,S,K,H]; got q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}")
    if q_segment.shape != q.shape[:2] or kv_segment.shape != k.shape[:2]:
        raise ValueError(f"segment ids {q_segment.shape} / {kv_segment.shape} do not match q {q.shape[:2]} / "
                         f"k {k.shape[:2]}")
    if causal and sequence_parallel_size() > 1:
        return context_parallel.context_parallel_attention(q, k, v, q_segment, kv_segment, scale, causal=True)
    if impl == "einsum":
        return blocked_attention(q, k, v, q_segment, kv_segment, scale, causal=causal, block=block)
    if impl == "xla_sdpa":
        return sdpa_attention(q, k, v, q_segment, kv_segment, scale, causal=causal, implementation="xla")
    if impl == "cudnn":
        problems = cudnn_problems(q, k)
        if problems:
            raise ValueError("attention='cudnn' cannot run this call: " + "; ".join(problems)
                             + " (use attention='auto', 'einsum' or 'xla_sdpa')")
        return sdpa_attention(q, k, v, q_segment, kv_segment, scale, causal=causal, implementation="cudnn")
    return sharded_splash_attention(q, k, v, q_segment, kv_segment, scale, causal=causal)


def _active_mesh():
    """(mesh or None, rules) activations are laid out on (sharding/rules.py current_mesh)."""
    return rules.current_mesh()


def sequence_parallel_size() -> int:
    """Size of the "sequence" axis of the active mesh (1 when none is active)."""
    mesh, _ = _active_mesh()
    return 1 if mesh is None else int(dict(mesh.shape).get("sequence", 1))


# ----------------------------------------------------------------------------------------------
# jax.nn.dot_product_attention ("xla_sdpa", "cudnn")

def segment_attention_mask(q_segment: jax.Array, kv_segment: jax.Array) -> jax.Array:
    """[B, T], [B, S] -> [B, 1, T, S] bool, same segment (padding rows see their own padding segment, so
    no row of a self-attention mask is empty; real rows see exactly their sample)."""
    return q_segment[:, None, :, None] == kv_segment[:, None, None, :]


def sdpa_attention(q, k, v, q_segment, kv_segment, scale: float, *, causal: bool, implementation: str):
    """jax.nn.dot_product_attention with the segment mask and is_causal (top-left aligned: s <= t)."""
    return jax.nn.dot_product_attention(q, k, v, mask=segment_attention_mask(q_segment, kv_segment),
                                        scale=scale, is_causal=causal, implementation=implementation)


def cudnn_problems(q: jax.Array, k: jax.Array, *, backend: str | None = None,
                   compute_capability: str | None = None) -> list[str]:
    """Why cuDNN flash attention cannot run on q [B,T,N,H], k [B,S,K,H] (empty list: it can). Mirrors the
    checks in jax._src.cudnn.fused_attention_stablehlo (dtype, head dim, even lengths with a bias)."""
    backend = backend or jax.default_backend()
    problems = []
    if backend not in ("gpu", "cuda"):
        problems.append(f"cuDNN needs an NVIDIA GPU backend, this one is {backend!r}")
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        problems.append(f"cuDNN needs bfloat16 or float16 q/k/v, got {jnp.dtype(q.dtype).name} "
                        "(set ModelConfig.dtype='bfloat16')")
    if compute_capability is None and backend in ("gpu", "cuda"):
        compute_capability = getattr(jax.devices()[0], "compute_capability", None)
    hopper = compute_capability is not None and float(compute_capability) >= 9.0
    max_head = 256 if hopper else 128
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > max_head:
        problems.append(f"cuDNN needs a head dim that is a multiple of 8 and at most {max_head}, got {head_dim}")
    if q.shape[1] % 2 or k.shape[1] % 2:
        problems.append(f"cuDNN with a mask needs even query/key lengths, got {q.shape[1]} / {k.shape[1]}")
    return problems


# ----------------------------------------------------------------------------------------------
# Pallas splash attention ("splash")

@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, q_len: int, kv_len: int, causal: bool, block: int, interpret: bool):
    """The splash kernel for one (unbatched) call: static causal or full mask on every head. Built eagerly
    (its mask tables are concrete arrays, so the cached kernel can be reused by any trace)."""
    # Pallas TPU kernels: loaded only when splash attention is chosen
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    with jax.ensure_compile_time_eval():
        return _build_splash_kernel(splash, heads, q_len, kv_len, causal, block, interpret)


def _build_splash_kernel(splash, heads, q_len, kv_len, causal, block, interpret):
    base = splash.CausalMask((q_len, kv_len)) if causal else splash.FullMask((q_len, kv_len))
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(splash.MultiHeadMask([base] * heads), head_shards=1, q_seq_shards=1,
                                  block_sizes=sizes, interpret=interpret)


def _pad_to(x: jax.Array, length: int, axis: int, value=0) -> jax.Array:
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def splash_attention(q, k, v, q_segment, kv_segment, scale: float, *, causal: bool,
                     block: int = SPLASH_BLOCK, interpret: bool | None = None) -> jax.Array:
    """Splash attention vmapped over the batch. q is pre-scaled (the kernel has no scale); heads move in
    front ([B, N, T, H], the kernel's layout); T and S are padded to a multiple of `block` with a segment
    id of their own. `interpret` defaults to True off TPU (Pallas interpret mode)."""
    # Pallas TPU kernels: loaded only when splash attention is chosen
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    b, t, n, h = q.shape
    s = k.shape[1]
    tp, sp = -(-t // block) * block, -(-s // block) * block
    kernel = _splash_kernel(n, tp, sp, bool(causal), block, bool(interpret))
    qx = _pad_to((q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3), tp, axis=2)     # [B, N, Tp, H]
    kx, vx = (_pad_to(a.transpose(0, 2, 1, 3), sp, axis=2) for a in (k, v))                # [B, K, Sp, H]
    qs = _pad_to(q_segment.astype(jnp.int32), tp, axis=1, value=_SPLASH_PAD_SEGMENT)
    ks = _pad_to(kv_segment.astype(jnp.int32), sp, axis=1, value=_SPLASH_PAD_SEGMENT)
    one = lambda qx, kx, vx, qs, ks: kernel(qx, kx, vx, splash.SegmentIds(q=qs, kv=ks))
    out = jax.vmap(one)(qx, kx, vx, qs, ks)                                                # [B, N, Tp, H]
    return out[:, :, :t].transpose(0, 2, 1, 3).astype(q.dtype)


def sharded_splash_attention(q, k, v, q_segment, kv_segment, scale: float, *, causal: bool) -> jax.Array:
    """splash_attention per device under the active mesh (a Pallas call has no automatic partitioning):
    jax.shard_map with the batch split as the rules split "act_batch" and heads as "act_heads" /
    "act_kv_heads" when q and kv heads split alike (so GQA groups stay whole), sequence unsplit."""
    mesh, rules = _active_mesh()
    run = functools.partial(splash_attention, scale=scale, causal=causal)
    if mesh is None or mesh.size == 1:
        return run(q, k, v, q_segment, kv_segment)
    q_spec = logical_to_spec(("act_batch", None, "act_heads", None), q.shape, mesh, rules)
    k_spec = logical_to_spec(("act_batch", None, "act_kv_heads", None), k.shape, mesh, rules)
    batch, heads = q_spec[0], q_spec[2] if q_spec[2] == k_spec[2] else None
    q_spec, k_spec = P(batch, None, heads, None), P(batch, None, heads, None)
    fn = jax.shard_map(run, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, P(batch, None), P(batch, None)),
                       out_specs=q_spec, check_vma=False)       # the Pallas call declares no varying axes
    return fn(q, k, v, q_segment.astype(jnp.int32), kv_segment.astype(jnp.int32))
