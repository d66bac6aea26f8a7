"""The optimizer: AdamW, linear warmup + cosine decay, global-norm clipping, weight-decay mask, freezing.

Built from the experiment config's `optimizer` block (an ml_collections ConfigDict or a plain dict):

    optimizer = dict(lr=3e-4, warmup_steps=100, total_steps=10_000, final_lr_fraction=0.1,
                     b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0, freeze=["vision"])
    opt = build_optimizer(config.optimizer)
    opt_state = opt.tx.init(params)

Every parameter gets one of three labels (by its "/"-joined path, e.g. "vision/blocks/attn/qkv/kernel"):
  "train"  : clip_by_global_norm -> AdamW (decoupled weight decay on kernels/embeddings/expert weights only);
  "frozen" : path starts with a `freeze` prefix; `set_to_zero`, no optimizer moments;
  "fixed"  : never trained by the optimizer (the MoE router `correction_bias`, updated by its own rule).
Frozen and fixed leaves are not differentiated by the train step at all (`Optimizer.trainable`), and the
step leaves them bit-for-bit unchanged. Clipping sees only trainable gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import optax

TRAIN, FROZEN, FIXED = "train", "frozen", "fixed"
# Leaf names the optimizer never touches (updated outside the gradient path).
FIXED_LEAF_NAMES = frozenset({"correction_bias"})
# Leaf names without weight decay (norm scales, biases); everything else with >= 2 dims decays.
NO_DECAY_LEAF_NAMES = frozenset({"scale", "bias", "correction_bias"})

DEFAULTS = dict(lr=None, warmup_steps=0, total_steps=None, final_lr_fraction=0.1, b1=0.9, b2=0.95,
                eps=1e-8, weight_decay=0.0, clip_norm=1.0, freeze=())


def path_str(path: Sequence[Any]) -> str:
    """'a/b/c' for a jax key path (dict keys, attribute names, sequence indices)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _matches(path: str, prefix: str) -> bool:
    prefix = prefix.strip("/")
    return path == prefix or path.startswith(prefix + "/")


def param_labels(params: Any, freeze: Sequence[str] = ()) -> Any:
    """Tree of "train" / "frozen" / "fixed" labels, one per leaf; raises on a freeze prefix matching nothing."""
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    unmatched = [f for f in freeze if not any(_matches(p, f) for p in paths)]
    if unmatched:
        raise ValueError(f"optimizer.freeze prefixes {unmatched} match no parameter; parameter paths start "
                         f"with {sorted({p.split('/')[0] for p in paths})}")

    def label(path, _):
        name = path_str(path)
        if name.rsplit("/", 1)[-1] in FIXED_LEAF_NAMES:
            return FIXED
        if any(_matches(name, f) for f in freeze):
            return FROZEN
        return TRAIN

    return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params: Any) -> Any:
    """True where AdamW applies weight decay: >= 2-dim leaves that are not norm scales or biases."""
    def decays(path, leaf):
        return path_str(path).rsplit("/", 1)[-1] not in NO_DECAY_LEAF_NAMES and len(leaf.shape) >= 2
    return jax.tree_util.tree_map_with_path(decays, params)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The optax transformation plus what the train step needs to know about it."""
    tx: optax.GradientTransformation
    schedule: optax.Schedule      # learning rate as a function of the number of applied updates
    freeze: tuple[str, ...]
    clip_norm: float | None

    def labels(self, params: Any) -> Any:
        return param_labels(params, self.freeze)

    def trainable(self, params: Any) -> Any:
        """Tree of Python bools: True for the leaves the step differentiates and updates."""
        return jax.tree.map(lambda label: label == TRAIN, self.labels(params))


def _check(cfg: dict) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(f"optimizer config: {msg}")
    need(cfg["lr"] is not None and cfg["lr"] > 0, f"lr must be > 0, got {cfg['lr']}")
    need(cfg["total_steps"] is not None and int(cfg["total_steps"]) > 0,
         f"total_steps must be a positive int, got {cfg['total_steps']}")
    need(0 <= int(cfg["warmup_steps"]) <= int(cfg["total_steps"]),
         f"warmup_steps must be in [0, total_steps={cfg['total_steps']}], got {cfg['warmup_steps']}")
    need(0.0 <= cfg["final_lr_fraction"] <= 1.0, f"final_lr_fraction must be in [0, 1], got {cfg['final_lr_fraction']}")
    for key in ("b1", "b2"):
        need(0.0 <= cfg[key] < 1.0, f"{key} must be in [0, 1), got {cfg[key]}")
    need(cfg["eps"] > 0, f"eps must be > 0, got {cfg['eps']}")
    need(cfg["weight_decay"] >= 0, f"weight_decay must be >= 0, got {cfg['weight_decay']}")
    need(cfg["clip_norm"] is None or cfg["clip_norm"] >= 0, f"clip_norm must be >= 0 or None, got {cfg['clip_norm']}")
    freeze = cfg["freeze"]
    need(not isinstance(freeze, str) and all(isinstance(f, str) and f.strip("/") for f in freeze),
         f"freeze must be a list of non-empty path prefixes such as ['vision'], got {freeze!r}")


def build_optimizer(cfg: Mapping[str, Any]) -> Optimizer:
    """Optimizer from the config's `optimizer` block; unknown keys and bad values raise ValueError."""
    given = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"optimizer config: unknown keys {sorted(unknown)}; expected {sorted(DEFAULTS)}")
    merged = {**DEFAULTS, **given}
    merged["freeze"] = tuple(merged["freeze"] or ()) if not isinstance(merged["freeze"], str) else merged["freeze"]
    _check(merged)
    lr = float(merged["lr"])
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=int(merged["warmup_steps"]),
        decay_steps=int(merged["total_steps"]), end_value=lr * float(merged["final_lr_fraction"]))
    clip = merged["clip_norm"]
    train_tx = optax.chain(
        optax.clip_by_global_norm(float(clip)) if clip else optax.identity(),
        optax.adamw(schedule, b1=float(merged["b1"]), b2=float(merged["b2"]), eps=float(merged["eps"]),
                    weight_decay=float(merged["weight_decay"]), mask=decay_mask))
    freeze = tuple(f.strip("/") for f in merged["freeze"])
    tx = optax.multi_transform({TRAIN: train_tx, FROZEN: optax.set_to_zero(), FIXED: optax.set_to_zero()},
                               lambda params: param_labels(params, freeze))
    return Optimizer(tx=tx, schedule=schedule, freeze=freeze, clip_norm=float(clip) if clip else None)
