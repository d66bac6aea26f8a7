"""GRPO: group-normalized advantages, the clipped policy loss (clip-higher), and the jitted update.

    stats = group_stats(rewards, **cfg.advantage_settings)        # rewards [n, G] -> mean, std, zero_variance,
                                                                  # advantages [n, G]
    loss, metrics = grpo_loss(new_logp, old_logp, adv_rows, response_mask, cfg)
    update = make_grpo_update(logp_fn, optimizer, cfg)           # logp_fn(params, batch) -> logp [B, T]
    state, metrics = update(state, batch)                         # num_minibatches x ppo_epochs optimizer steps

Position convention (BATCH.md `targets`): every [B, T] array is about the token targets[b, t], the one that
follows position t. logp[b, t] = log pi(targets[b, t] | tokens <= t); response_mask[b, t] = 1 where
targets[b, t] is a sampled response token. The sampler's old log-probs must use the same positions (and the
same temperature: pass it to `token_logprobs`).

Per-token objective (A = advantage, r = exp(logp - old_logp)):
    L = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))   [dual clip: min(L, -A c) where A < 0]
        + kl_coef * k3(ref || new) - entropy_coef * entropy
Aggregation over the response tokens (m = response_mask):
    "per_sample" (the paper): mean over samples of (sum_t L m / sum_t m)
    "per_token"  (DAPO):      sum L m / sum m
    "dr_grpo":                sum L m / (num_samples * max_len)
Each mode is computed as (loss_sum, weight) with loss = loss_sum / weight, so the generic train step's
gradient accumulation (sum of loss_sums / sum of weights) gives the same update as one big minibatch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from glmv_jax.batch import ROW_AXIS
from glmv_jax.models import glmv
from glmv_jax.train import step as step_lib
from glmv_jax.train.optimizer import Optimizer
from glmv_jax.train.state import TrainState

AGGREGATIONS = ("per_sample", "per_token", "dr_grpo")
LogpFn = Callable[[Any, dict], Any]   # (params, batch) -> logp [B, T] or (logp [B, T], entropy [B, T])
MAX_LOG_RATIO = 20.0                  # exp() argument clamp, as in verl


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    eps_low: float = 0.2              # ratio floor 1 - eps_low (applies where A < 0)
    eps_high: float = 0.28            # ratio ceiling 1 + eps_high (applies where A > 0): clip-higher
    dual_clip: float | None = None    # c > 1: bound the loss of A < 0 tokens at -A c (off by default)
    aggregation: str = "per_sample"
    max_len: int | None = None        # dr_grpo's constant; None = the batch's T
    kl_coef: float = 0.0              # > 0 needs batch["ref_logp"]
    entropy_coef: float = 0.0         # > 0 needs logp_fn to return (logp, entropy)
    normalize_std: bool = True        # divide advantages by the group std (False = Dr.GRPO)
    std_ddof: int = 1                 # 1: unbiased std as verl / TRL
    std_eps: float = 1e-6
    zero_var_eps: float = 1e-6        # a group whose reward std (ddof 0) is <= this gets advantage 0
    num_minibatches: int = 1
    ppo_epochs: int = 1
    shuffle: bool = True              # new row (or minibatch) order every epoch
    grad_accum_steps: int = 1         # micro-batches inside each minibatch update
    recompute_old_logp: bool = False  # replace the sampler's old_logp by logp_fn(params before the update)
    signal_rows_only: bool = False    # the loss normaliser counts only rows with a nonzero advantage, so the
                                      # step size does not shrink with the share of zero-variance groups
                                      # trained (comparing samplers at the same effective step)

    def __post_init__(self):
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"GRPOConfig: {msg}")
        need(self.aggregation in AGGREGATIONS, f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        need(0.0 <= self.eps_low < 1.0, f"eps_low must be in [0, 1), got {self.eps_low}")
        need(self.eps_high >= 0.0, f"eps_high must be >= 0, got {self.eps_high}")
        need(self.dual_clip is None or self.dual_clip > 1.0, f"dual_clip must be None or > 1, got {self.dual_clip}")
        need(self.max_len is None or self.max_len > 0, f"max_len must be None or > 0, got {self.max_len}")
        need(self.kl_coef >= 0 and self.entropy_coef >= 0,
             f"kl_coef and entropy_coef must be >= 0, got {self.kl_coef}, {self.entropy_coef}")
        need(self.std_ddof in (0, 1), f"std_ddof must be 0 or 1, got {self.std_ddof}")
        for name in ("num_minibatches", "ppo_epochs", "grad_accum_steps"):
            need(int(getattr(self, name)) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def advantage_settings(self) -> dict:
        """group_stats' keyword arguments."""
        return dict(normalize_std=self.normalize_std, std_ddof=self.std_ddof, std_eps=self.std_eps,
                    zero_var_eps=self.zero_var_eps)


# ----------------------------------------------------------------------------------------------- advantages

@dataclasses.dataclass(frozen=True)
class GroupStats:
    """Per-group reward statistics of rewards [n, G] (fp64, advantages fp32)."""
    mean: np.ndarray              # [n]
    std: np.ndarray               # [n], with ddof std_ddof
    zero_variance: np.ndarray     # [n] bool: the population std (ddof 0) is <= zero_var_eps (all right, all wrong, ...)
    advantages: np.ndarray        # [n, G]


def group_stats(rewards: Any, *, normalize_std: bool = True, std_ddof: int = 1, std_eps: float = 1e-6,
                zero_var_eps: float = 1e-6) -> GroupStats:
    """The one place of GRPO's group statistics: rewards [n, G] -> GroupStats. advantages = (r - group mean) /
    (group std + std_eps) with normalize_std, else r - group mean; exactly 0 in zero-variance groups."""
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [num_groups, G] or flat with group_size, got shape {rewards.shape}")
    if rewards.shape[1] < 2:
        raise ValueError(f"GRPO needs at least 2 samples per group, got G={rewards.shape[1]}")
    if std_ddof not in (0, 1):
        raise ValueError(f"std_ddof must be 0 or 1, got {std_ddof}")
    mean = rewards.mean(axis=1)
    std = rewards.std(axis=1, ddof=std_ddof)
    zero = rewards.std(axis=1) <= zero_var_eps
    centred = np.where(zero[:, None], 0.0, rewards - mean[:, None])
    scale = np.where(zero, 1.0, std + std_eps) if normalize_std else np.ones_like(std)   # no 0 / 0 in constant groups
    adv = (centred / scale[:, None]).astype(np.float32)
    return GroupStats(mean, std, zero, adv)


def group_advantages(rewards: Any, group_size: int | None = None, **settings) -> np.ndarray:
    """group_stats(...).advantages of rewards [num_groups, G], or of flat rewards [num_groups * G] with
    `group_size` (groups contiguous; the result is flat too). settings: group_stats' keywords."""
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 1:
        return group_stats(rewards, **settings).advantages
    if not group_size or rewards.shape[0] % group_size:
        raise ValueError(f"flat rewards of shape {rewards.shape} need a group_size dividing it, got {group_size}")
    return group_stats(rewards.reshape(-1, group_size), **settings).advantages.reshape(-1)


# ----------------------------------------------------------------------------------------------- log-probs

def token_logprobs(logits: jax.Array, targets: jax.Array, *, temperature: float = 1.0,
                   with_entropy: bool = False):
    """Log-prob of each target token under softmax(logits / temperature), fp32.

    logits [B, T, V] (any float dtype), targets [B, T] int -> logp [B, T] (and entropy [B, T] with
    with_entropy). One fp32 view of the logits feeds the logsumexp, the gather and the entropy.
    """
    if tuple(logits.shape[:-1]) != tuple(targets.shape):
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = logits.astype(jnp.float32)
    if temperature != 1.0:
        x = x / temperature
    lse = jax.nn.logsumexp(x, axis=-1)
    logp = jnp.take_along_axis(x, targets[..., None].astype(jnp.int32), axis=-1)[..., 0] - lse
    if not with_entropy:
        return logp
    entropy = lse - jnp.sum(jnp.exp(x - lse[..., None]) * x, axis=-1)
    return logp, entropy


def make_model_logp_fn(config: Any, *, temperature: float = 1.0, with_entropy: bool = False) -> LogpFn:
    """logp_fn for the GLM-V model: a BATCH.md batch (with `targets`) -> token_logprobs of its logits."""
    def logp_fn(params, batch):
        return token_logprobs(glmv.apply(config, params, batch), batch["targets"], temperature=temperature,
                              with_entropy=with_entropy)
    return logp_fn


# ----------------------------------------------------------------------------------------------- the loss

def _check_loss_inputs(new_logp, old_logp, advantages, response_mask, cfg, ref_logp, entropy) -> None:
    shape = tuple(response_mask.shape)
    if len(shape) != 2:
        raise ValueError(f"response_mask must be [B, T], got {shape}")
    for name, x in (("new_logp", new_logp), ("old_logp", old_logp), ("ref_logp", ref_logp), ("entropy", entropy)):
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected response_mask's {shape}")
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(f"advantages must be [B] or [B, T] for response_mask {shape}, got {tuple(advantages.shape)}")
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp (batch['ref_logp'], the reference policy's token log-probs)")
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs per-token entropy (logp_fn must return (logp, entropy))")


def policy_loss_terms(new_logp, old_logp, advantages, response_mask, cfg: GRPOConfig, *, ref_logp=None,
                      entropy=None) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """-> (loss_sum, weight, sums): loss = loss_sum / weight for cfg.aggregation; `sums` are additive
    statistics (tokens, samples, clip counts, ratio sums, approx-KL sums, ...) that `finalize_metrics` turns
    into means. Arrays [B, T] as in the module docstring; advantages [B] or [B, T]."""
    _check_loss_inputs(new_logp, old_logp, advantages, response_mask, cfg, ref_logp, entropy)
    mask = response_mask.astype(jnp.float32)
    new_logp = new_logp.astype(jnp.float32)
    old_logp = jax.lax.stop_gradient(old_logp.astype(jnp.float32))
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    adv = adv[:, None] if adv.ndim == 1 else adv

    log_ratio = jnp.clip(new_logp - old_logp, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    token_loss = jnp.maximum(-adv * ratio, -adv * clipped)
    if cfg.dual_clip is not None:
        token_loss = jnp.where(adv < 0, jnp.minimum(token_loss, -adv * cfg.dual_clip), token_loss)
    sums: dict[str, jax.Array] = {}
    if cfg.kl_coef > 0:
        delta = jnp.clip(ref_logp.astype(jnp.float32) - new_logp, -MAX_LOG_RATIO, MAX_LOG_RATIO)
        kl = jnp.exp(delta) - delta - 1.0                                     # k3 estimator of KL(new || ref)
        token_loss = token_loss + cfg.kl_coef * kl
        sums["kl_ref"] = jnp.sum(kl * mask)
    if entropy is not None:
        sums["entropy"] = jnp.sum(entropy.astype(jnp.float32) * mask)
        if cfg.entropy_coef > 0:
            token_loss = token_loss - cfg.entropy_coef * entropy.astype(jnp.float32)

    row_tokens = mask.sum(axis=1)
    real_rows = (row_tokens > 0).astype(jnp.float32)
    num_samples, num_tokens = real_rows.sum(), mask.sum()
    counted = real_rows
    if cfg.signal_rows_only:
        counted = real_rows * (jnp.max(jnp.abs(adv) * mask, axis=1) > 0).astype(jnp.float32)
    masked = token_loss * mask
    if cfg.aggregation == "per_sample":
        loss_sum, weight = jnp.sum(masked.sum(axis=1) / jnp.maximum(row_tokens, 1.0)), counted.sum()
    elif cfg.aggregation == "per_token":
        loss_sum, weight = masked.sum(), jnp.sum(mask * counted[:, None])
    else:  # dr_grpo
        max_len = cfg.max_len or mask.shape[1]
        loss_sum, weight = masked.sum() / max_len, counted.sum()

    ratio_sg, log_ratio_sg = jax.lax.stop_gradient(ratio), jax.lax.stop_gradient(log_ratio)
    sums.update(
        tokens=num_tokens, samples=num_samples,
        clip_low=jnp.sum(((adv < 0) & (ratio_sg < 1.0 - cfg.eps_low)) * mask),
        clip_high=jnp.sum(((adv > 0) & (ratio_sg > 1.0 + cfg.eps_high)) * mask),
        ratio=jnp.sum(ratio_sg * mask), ratio_sq=jnp.sum(ratio_sg ** 2 * mask),
        approx_kl=jnp.sum((ratio_sg - 1.0 - log_ratio_sg) * mask),              # k3 of KL(old || new)
        neg_logp=jnp.sum(-jax.lax.stop_gradient(new_logp) * mask),             # sampled-token entropy estimate
        advantage=jnp.sum(adv * mask))
    return loss_sum, weight, sums


def finalize_metrics(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Additive sums -> metrics: clip_frac_low/high, clip_frac, ratio_mean/std, approx_kl, entropy, ...
    (per response token)."""
    tokens = jnp.maximum(sums["tokens"], 1.0)
    ratio_mean = sums["ratio"] / tokens
    out = {"clip_frac_low": sums["clip_low"] / tokens, "clip_frac_high": sums["clip_high"] / tokens,
           "clip_frac": (sums["clip_low"] + sums["clip_high"]) / tokens, "ratio_mean": ratio_mean,
           "ratio_std": jnp.sqrt(jnp.maximum(sums["ratio_sq"] / tokens - ratio_mean ** 2, 0.0)),
           "approx_kl": sums["approx_kl"] / tokens, "neg_logp": sums["neg_logp"] / tokens,
           "advantage_mean": sums["advantage"] / tokens, "tokens": sums["tokens"], "samples": sums["samples"]}
    if "entropy" in sums:
        out["entropy"] = sums["entropy"] / tokens
    if "kl_ref" in sums:
        out["kl_ref"] = sums["kl_ref"] / tokens
    return out


def grpo_loss(new_logp, old_logp, advantages, response_mask, cfg: GRPOConfig, *, ref_logp=None, entropy=None):
    """The GRPO policy loss -> (loss scalar fp32, metrics). See the module docstring for the formula."""
    loss_sum, weight, sums = policy_loss_terms(new_logp, old_logp, advantages, response_mask, cfg,
                                               ref_logp=ref_logp, entropy=entropy)
    return loss_sum / jnp.maximum(weight, 1.0), finalize_metrics(sums)


# ----------------------------------------------------------------------------------------------- the update

ROLLOUT_KEYS = ("response_mask", "old_logp", "advantages")


def _rows(batch: dict) -> int:
    return batch["response_mask"].shape[0]


def _take_rows(batch: dict, rows: jax.Array) -> dict:
    """Rows `rows` of every per-row entry (axis 1 of position_ids, axis 0 otherwise)."""
    return {k: jnp.take(v, rows, axis=ROW_AXIS.get(k, 0)) for k, v in batch.items()}


def _check_batch(batch: dict, cfg: GRPOConfig, presplit: bool, has_ref: bool) -> None:
    missing = [k for k in ROLLOUT_KEYS if k not in batch]
    if missing:
        raise ValueError(f"rollout batch lacks {missing}; it needs {list(ROLLOUT_KEYS)} besides the model inputs")
    if cfg.kl_coef > 0 and "ref_logp" not in batch and not has_ref:
        raise ValueError("kl_coef > 0 needs batch['ref_logp'] (reference token log-probs) or update(..., ref_params)")
    if presplit:
        for k, v in batch.items():
            if v.shape[:1] != (cfg.num_minibatches,):
                raise ValueError(f"presplit batch[{k!r}] has shape {v.shape}; expected a leading axis of "
                                 f"num_minibatches={cfg.num_minibatches}")
        return
    rows = _rows(batch)
    if rows % cfg.num_minibatches:
        raise ValueError(f"{rows} rollout rows are not divisible by num_minibatches={cfg.num_minibatches}")
    for k, v in batch.items():
        axis = ROW_AXIS.get(k, 0)
        if v.ndim <= axis or v.shape[axis] != rows:
            raise ValueError(f"batch[{k!r}] with shape {v.shape} is not per-row ({rows} rows); batches with packed "
                             f"vision rows must be built per minibatch and passed with presplit=True")


def make_grpo_update(logp_fn: LogpFn, optimizer: Optimizer, cfg: GRPOConfig, *, presplit: bool = False,
                     nonfinite: str = "skip", jit: bool = True) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`update(state, batch, ref_params=None) -> (state, metrics)`: cfg.ppo_epochs x cfg.num_minibatches
    optimizer steps.

    batch: the model inputs logp_fn needs (BATCH.md keys incl. vision) + response_mask [B, T], old_logp [B, T],
    advantages [B] or [B, T] (+ ref_logp [B, T] when kl_coef > 0, unless ref_params, the reference policy's
    params, are passed: then ref_logp = logp_fn(ref_params, batch)). Rows are reshuffled into minibatches every
    epoch. With presplit=True every entry has a leading [num_minibatches] axis (for packed vision rows, which
    only the rollout assembler can split): the minibatch order is reshuffled instead, and with grad_accum_steps
    k > 1 entries are [num_minibatches, k, ...].
    Each minibatch step is `train.step.make_train_step` (grad accumulation, clipping, NaN/Inf skip).
    metrics: means over all updates (loss, grad_norm, clip fractions, approx_kl, ratio stats, ...), the same
    policy statistics of the first minibatch as "first/<name>" (ratio 1 when on-policy), and "per_update/<name>"
    arrays [ppo_epochs * num_minibatches].
    """
    M, E = int(cfg.num_minibatches), int(cfg.ppo_epochs)

    def loss_fn(params, mb, rng):
        del rng
        out = logp_fn(params, mb)
        new_logp, entropy = out if isinstance(out, tuple) else (out, None)
        loss_sum, weight, sums = policy_loss_terms(new_logp, mb["old_logp"], mb["advantages"], mb["response_mask"],
                                                   cfg, ref_logp=mb.get("ref_logp"), entropy=entropy)
        return loss_sum, (weight, {f"{k}_sum": v for k, v in sums.items()})

    split_fn = step_lib.presplit if presplit else None
    train_step = step_lib.make_train_step(loss_fn, optimizer, grad_accum_steps=cfg.grad_accum_steps,
                                          nonfinite=nonfinite, split_fn=split_fn, jit=False)

    def logp_at(params, batch):
        """logp_fn at `params`, one (micro-)batch at a time (rows in their original order)."""
        logp_of = lambda mb: jax.lax.stop_gradient(_as_logp(logp_fn(params, mb)))
        if presplit:
            per_minibatch = logp_of if cfg.grad_accum_steps == 1 else (lambda mb: jax.lax.map(logp_of, mb))
            return jax.lax.map(per_minibatch, batch)
        rows = _rows(batch)
        chunks = jnp.arange(rows).reshape(M, rows // M)
        return jax.lax.map(lambda idx: logp_of(_take_rows(batch, idx)), chunks).reshape(rows, -1)

    def update(state: TrainState, batch: dict, ref_params: Any = None) -> tuple[TrainState, dict]:
        _check_batch(batch, cfg, presplit, ref_params is not None)
        batch = dict(batch)
        if ref_params is not None and cfg.kl_coef > 0:
            batch["ref_logp"] = logp_at(ref_params, batch)
        if cfg.recompute_old_logp:
            batch["old_logp"] = logp_at(state.params, batch)
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0x67727030)
        n = M if presplit else _rows(batch)
        orders = jnp.stack([jax.random.permutation(k, n) if cfg.shuffle else jnp.arange(n)
                            for k in jax.random.split(rng, E)])                     # [E, n]
        orders = orders.reshape(E * M, -1)                                           # [E*M, n/M] rows or [E*M, 1]

        def body(st, order):
            if presplit:
                mb = jax.tree.map(lambda x: x[order[0]], batch)
            else:
                mb = _take_rows(batch, order)
            st, metrics = train_step(st, mb)
            return st, metrics

        state, per_update = jax.lax.scan(body, state, orders)
        return state, _summarize(per_update)

    if not jit:
        return update
    return jax.jit(update, donate_argnums=(0,))


def _as_logp(out):
    return out[0] if isinstance(out, tuple) else out


def _summarize(per_update: dict) -> dict:
    sums = {k[:-4]: v for k, v in per_update.items() if k.endswith("_sum")}
    others = {k: v for k, v in per_update.items() if not k.endswith("_sum")}
    metrics = {k: jnp.mean(v) for k, v in others.items() if k not in ("nonfinite_count",)}
    metrics["nonfinite_count"] = others["nonfinite_count"][-1]
    metrics["updates"] = jnp.asarray(others["loss"].shape[0], jnp.int32)
    metrics.update(finalize_metrics({k: v.sum() for k, v in sums.items()}))
    metrics.update({f"first/{k}": v for k, v in finalize_metrics({k: v[0] for k, v in sums.items()}).items()})
    metrics.update({f"per_update/{k}": v for k, v in others.items()})
    metrics.update({f"per_update/{k}": v for k, v in
                    jax.vmap(finalize_metrics)(sums).items() if k in ("approx_kl", "clip_frac", "ratio_mean")})
    return metrics
