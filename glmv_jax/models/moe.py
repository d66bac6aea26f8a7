"""GLM-4.5V / 4.6V MoE layer (GLM-4.5-Air; DeepSeek-V3 "noaux_tc" routing), exact to HF Glm4vMoeTextMoE.

Calling contract (functional; the decoder calls this):

    y, aux = moe_layer(params, x, text_cfg, mask=None, options=MoEOptions())

  params  one layer's `moe` subtree (PARAM_TREE.md, without the leading L axis):
          router/kernel (D,E) fp32, router/correction_bias (E,) fp32, experts/gate (E,D,F),
          experts/up (E,D,F), experts/down (E,F,D), shared/{gate,up}/kernel (D,Fs), shared/down/kernel (Fs,D)
  x       [B, T, D] or [N, D] in the compute dtype (weights are cast to it); y has x's shape and dtype
  mask    optional [B, T] / [N] (1 = real token): only the statistics in `aux` skip padding
  aux     load [E] int32 (routed token copies per expert), dropped int32 (token copies a capacity path
          dropped; 0 when dropless), seq_aux_loss fp32 (DeepSeek-V3 sequence-wise balance loss, not yet
          times its coefficient), lb_counts [E] / lb_probs [E] / lb_rows (per-layer sums for HF's
          Switch-style loss; combine layers with moe_balance.hf_load_balancing_loss)

The NNX module `MoE(text_cfg, rngs=...)` holds the same tree (logical axes: router ("embed", None);
experts ("exp", "moe_embed", "moe_mlp") / ("exp", "moe_mlp", "moe_embed"); shared ("embed", "mlp") /
("mlp", "embed")); `correction_bias` is a `RouterBias` variable, not an nnx.Param, so optimizers that
filter on Param skip it (update it with moe_balance.update_correction_bias).

Numerics (docs/models.md sections 8 and 11): router logits and sigmoid in fp32; the correction bias only
selects; weights come from the raw scores, normalized (+1e-20) if norm_topk_prob, times
routed_scaling_factor; each expert output is in the compute dtype, multiplied by its fp32 weight and
summed in fp32, cast once, then the (ungated) shared expert is added.
Dispatch (`MoEOptions`): "sorted" (dropless grouped matmuls, moe_gmm.py; default) or "dense" (every
expert on every token; a test reference). `parallel=ExpertParallel(...)` runs the experts inside
shard_map over an expert mesh axis (moe_parallel.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from glmv_jax.config import TextConfig
from glmv_jax.models import moe_balance
from glmv_jax.models.moe_gmm import GMM_IMPLS, combine, grouped_ffn
from glmv_jax.models.moe_parallel import ExpertParallel, expert_parallel_mix

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class MoEOptions:
    dispatch: str = "sorted"              # "sorted" (dropless grouped matmul) | "dense" (all experts; tests)
    gmm: str = "auto"                     # moe_gmm.GMM_IMPLS: auto (tiled on CPU, ragged_dot elsewhere)
    tile: int = 128                       # rows per tile of the "tiled" grouped matmul
    parallel: ExpertParallel | None = None

    def validate(self) -> "MoEOptions":
        if self.dispatch not in ("sorted", "dense"):
            raise ValueError(f"unknown MoE dispatch {self.dispatch!r}; expected 'sorted' or 'dense'")
        if self.gmm not in GMM_IMPLS:
            raise ValueError(f"unknown grouped-matmul impl {self.gmm!r}; expected one of {GMM_IMPLS}")
        if self.tile < 1:
            raise ValueError(f"tile must be >= 1, got {self.tile}")
        if self.parallel is not None and self.dispatch != "sorted":
            raise ValueError("expert parallelism needs dispatch='sorted'")
        return self


class Routing(NamedTuple):
    weights: jax.Array   # [N, K] fp32 mixing weights
    experts: jax.Array   # [N, K] int32 chosen experts
    logits: jax.Array    # [N, E] fp32 router logits
    scores: jax.Array    # [N, E] fp32 sigmoid scores (no bias)


def route(x, kernel, correction_bias, cfg: TextConfig) -> Routing:
    """HF Glm4vMoeTextTopkRouter. x [N, D] -> Routing."""
    n, e, k = x.shape[0], cfg.n_routed_experts, cfg.num_experts_per_tok
    logits = jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32), precision=HIGHEST)
    scores = jax.nn.sigmoid(logits)
    choice = scores + jax.lax.stop_gradient(correction_bias.astype(jnp.float32))
    if cfg.n_group > 1:
        grouped = choice.reshape(n, cfg.n_group, e // cfg.n_group)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)                         # [N, n_group]
        kept = jax.lax.top_k(group_score, cfg.topk_group)[1]                         # [N, topk_group]
        keep = jax.nn.one_hot(kept, cfg.n_group, dtype=jnp.bool_).any(axis=1)        # [N, n_group]
        choice = jnp.where(jnp.repeat(keep, e // cfg.n_group, axis=1), choice, -jnp.inf)
    experts = jax.lax.top_k(jax.lax.stop_gradient(choice), k)[1].astype(jnp.int32)
    weights = jnp.take_along_axis(scores, experts, axis=1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return Routing(weights * cfg.routed_scaling_factor, experts, logits, scores)


def swiglu(x, gate, up, down):
    """down(silu(x gate) * (x up)) in x.dtype. x [N, D], gate/up [D, F], down [F, D]."""
    dt = x.dtype
    return (jax.nn.silu(x @ gate.astype(dt)) * (x @ up.astype(dt))) @ down.astype(dt)


def dense_expert_mix(x, weights, experts, gate, up, down):
    """Reference: every expert on every token, mixed by a dense [N, E] gate matrix. -> [N, D] fp32."""
    n, dt = x.shape[0], x.dtype
    gates = jnp.zeros((n, gate.shape[0]), jnp.float32).at[jnp.arange(n)[:, None], experts].add(weights)
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", x, gate.astype(dt))) * jnp.einsum("nd,edf->enf", x, up.astype(dt))
    y = jnp.einsum("enf,efd->end", h, down.astype(dt))
    return jnp.einsum("end,ne->nd", y.astype(jnp.float32), gates, precision=HIGHEST)


def sorted_expert_mix(x, weights, experts, gate, up, down, *, gmm="auto", tile=128):
    """Dropless: token copies sorted by expert through grouped matmuls. -> [N, D] fp32."""
    n, k = experts.shape
    rows = jnp.arange(n * k, dtype=jnp.int32) // k
    y = grouped_ffn(x, rows, experts.reshape(-1), gate, up, down, max_rows=n * k, impl=gmm, tile=tile)
    return combine(y, weights)


def _check(params, x, cfg: TextConfig) -> None:
    if not cfg.moe:
        raise ValueError("moe_layer needs a MoE text config (cfg.moe is False)")
    d, e, f = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    if x.ndim not in (2, 3) or x.shape[-1] != d:
        raise ValueError(f"MoE input must be [B, T, {d}] or [N, {d}], got shape {tuple(x.shape)}")
    if cfg.n_group > 1 and e // cfg.n_group < 2:
        raise ValueError(f"group-limited routing scores a group by its top-2 experts; n_group {cfg.n_group} "
                         f"leaves {e // cfg.n_group} expert(s) per group")
    fs = f * cfg.n_shared_experts
    want = {("router", "kernel"): (d, e), ("router", "correction_bias"): (e,), ("experts", "gate"): (e, d, f),
            ("experts", "up"): (e, d, f), ("experts", "down"): (e, f, d), ("shared", "gate", "kernel"): (d, fs),
            ("shared", "up", "kernel"): (d, fs), ("shared", "down", "kernel"): (fs, d)}
    for path, shape in want.items():
        node = params
        try:
            for key in path:
                node = node[key]
        except (KeyError, TypeError, IndexError):
            raise ValueError(f"MoE params lack {'/'.join(path)} (expected shape {shape})") from None
        if tuple(node.shape) != shape:
            raise ValueError(f"MoE param {'/'.join(path)} has shape {tuple(node.shape)}, expected {shape}")


def moe_layer(params, x, cfg: TextConfig, *, mask=None, options: MoEOptions = MoEOptions()):
    """The MoE block (see the module docstring). Returns (y like x, aux dict)."""
    _check(params, x, cfg)
    options.validate()
    params, x = jax.tree.map(jnp.asarray, params), jnp.asarray(x)
    shape, d = x.shape, x.shape[-1]
    x2 = x.reshape(-1, d)
    r = route(x2, params["router"]["kernel"], params["router"]["correction_bias"], cfg)
    ex = params["experts"]
    dropped = jnp.zeros((), jnp.int32)
    if options.parallel is not None:
        mix, dropped = expert_parallel_mix(x2, r.weights, r.experts, ex["gate"], ex["up"], ex["down"],
                                           options.parallel, gmm=options.gmm, tile=options.tile)
    elif options.dispatch == "dense":
        mix = dense_expert_mix(x2, r.weights, r.experts, ex["gate"], ex["up"], ex["down"])
    else:
        mix = sorted_expert_mix(x2, r.weights, r.experts, ex["gate"], ex["up"], ex["down"],
                                gmm=options.gmm, tile=options.tile)
    sh = params["shared"]
    y = mix.astype(x.dtype) + swiglu(x2, sh["gate"]["kernel"], sh["up"]["kernel"], sh["down"]["kernel"])
    seqs = shape[0] if len(shape) == 3 else 1
    aux = moe_balance.routing_stats(r.logits, r.scores, r.experts, cfg.num_experts_per_tok, seqs, mask)
    aux["dropped"] = dropped
    return y.reshape(shape), aux


# ----------------------------------------------------------------------------------------------
# NNX module holding the same tree.

class RouterBias(nnx.Variable):
    """The aux-loss-free correction bias: used for expert selection only, updated outside the optimizer."""


class _Node(nnx.Module):
    def __init__(self, **children: Any):
        for name, child in children.items():
            setattr(self, name, child)


def _param(init, key, shape, dtype, names, kind=nnx.Param):
    if not jax.sharding.get_abstract_mesh().empty:
        return kind(nnx.with_partitioning(init, names)(key, shape, dtype))
    return kind(init(key, shape, dtype), sharding_names=names, eager_sharding=False)


class MoE(nnx.Module):
    """NNX holder of one MoE layer's params; `__call__(x, mask=None, options=None)` -> (y, aux); options
    default to the ones given at construction (e.g. MoEOptions(parallel=ExpertParallel(mesh)))."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, init_std: float = 0.02,
                 options: MoEOptions = MoEOptions()):
        d, e, f, fs = (cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size,
                       cfg.moe_intermediate_size * cfg.n_shared_experts)
        self.cfg, self.options = cfg, options.validate()
        normal, zeros = nnx.initializers.normal(init_std), nnx.initializers.zeros_init()
        p = lambda shape, names, dtype=param_dtype: _param(normal, rngs.params(), shape, dtype, names)
        self.router = _Node(kernel=p((d, e), ("embed", None), jnp.float32),
                            correction_bias=_param(zeros, rngs.params(), (e,), jnp.float32, (None,), RouterBias))
        self.experts = _Node(gate=p((e, d, f), ("exp", "moe_embed", "moe_mlp")),
                             up=p((e, d, f), ("exp", "moe_embed", "moe_mlp")),
                             down=p((e, f, d), ("exp", "moe_mlp", "moe_embed")))
        self.shared = _Node(gate=_Node(kernel=p((d, fs), ("embed", "mlp"))),
                            up=_Node(kernel=p((d, fs), ("embed", "mlp"))),
                            down=_Node(kernel=p((fs, d), ("mlp", "embed"))))

    def __call__(self, x, mask=None, options: MoEOptions | None = None):
        params = nnx.to_pure_dict(nnx.state(self))
        return moe_layer(params, x, self.cfg, mask=mask, options=self.options if options is None else options)
