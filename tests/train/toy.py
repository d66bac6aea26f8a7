"""A tiny real model and data for the train tests: a 2-layer residual MLP language model with a "vision"
feature projection, a router with a correction bias and an aux loss, and a deterministic Grain iterator.

Param paths follow PARAM_TREE.md's naming (vision/..., text/..., lm_head/...), so freezing "vision" and the
router `correction_bias` exclusion are exercised on the same names the real model uses.
"""

from __future__ import annotations

import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np

from glmv_jax.train.losses import cross_entropy
from glmv_jax.train.optimizer import build_optimizer
from glmv_jax.train.step import make_train_step

V, D, H, F, E, L = 32, 16, 32, 8, 4, 2   # vocab, width, mlp width, vision feature, experts, layers
B, T = 8, 8                              # rows, tokens per row
AUX_COEF = 0.01

LOGICAL_AXES = {
    "vision": {"proj": {"kernel": ("vit_patch", "vit_embed")}, "norm": {"scale": ("vit_embed",)}},
    "text": {"embed": {"embedding": ("vocab", "embed")},
             "layers": {"mlp_norm": {"scale": ("layers", "embed")},
                        "mlp": {"up": {"kernel": ("layers", "embed", "mlp")},
                                "down": {"kernel": ("layers", "mlp", "embed")}}},
             "moe": {"router": {"kernel": ("embed", "exp"), "correction_bias": ("exp",)}},
             "final_norm": {"scale": ("embed",)}},
    "lm_head": {"kernel": ("embed", "vocab")},
}


def init_params(seed: int = 0) -> dict:
    """Numpy init (cheap: no PRNG program to compile)."""
    rng = np.random.default_rng(seed)
    normal = lambda shape, fan_in: (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)
    ones = lambda shape: np.ones(shape, np.float32)
    return {
        "vision": {"proj": {"kernel": normal((F, D), F)}, "norm": {"scale": ones((D,))}},
        "text": {"embed": {"embedding": normal((V, D), 1.0)},
                 "layers": {"mlp_norm": {"scale": ones((L, D))},
                            "mlp": {"up": {"kernel": normal((L, D, H), D)}, "down": {"kernel": normal((L, H, D), H)}}},
                 "moe": {"router": {"kernel": normal((D, E), D), "correction_bias": 0.1 * normal((E,), 1.0)}},
                 "final_norm": {"scale": ones((D,))}},
        "lm_head": {"kernel": normal((D, V), D)},
    }


def _rms(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def make_loss_fn(dropout: float = 0.0):
    """loss_fn(params, batch, rng) -> (loss_sum, (token_count, aux)); dropout uses the step's rng."""
    def loss_fn(params: dict, batch: dict, rng: jax.Array):
        text = params["text"]
        vis = _rms(batch["feat"] @ params["vision"]["proj"]["kernel"], params["vision"]["norm"]["scale"])
        h = text["embed"]["embedding"][batch["input_ids"]] + vis[:, None, :]

        def layer(h, p):
            u = jax.nn.relu(_rms(h, p["mlp_norm"]["scale"]) @ p["mlp"]["up"]["kernel"])
            return h + u @ p["mlp"]["down"]["kernel"], None

        h, _ = jax.lax.scan(layer, h, text["layers"])
        router = text["moe"]["router"]
        probs = jax.nn.softmax(h @ router["kernel"] + router["correction_bias"], axis=-1)   # [B, T, E]
        h = h + 0.1 * probs @ router["kernel"].T
        if dropout:
            keep = jax.random.bernoulli(rng, 1.0 - dropout, h.shape[-1:])
            h = jnp.where(keep, h / (1.0 - dropout), 0.0)
        logits = _rms(h, text["final_norm"]["scale"]) @ params["lm_head"]["kernel"]
        loss_sum, count, extras = cross_entropy(logits, batch["targets"], batch["loss_mask"])
        # A per-token router penalty averaged over the loss tokens, so that token-weighted accumulation of
        # micro-batch values equals the big-batch value exactly (batch-level balance losses would not).
        aux_loss = AUX_COEF * jnp.sum(jnp.sum(probs ** 2, -1) * batch["loss_mask"]) / jnp.maximum(count, 1.0)
        return loss_sum, (count, {"moe_aux_loss": aux_loss, "ce_sum": extras["ce_sum"]})
    return loss_fn


def make_row(index: int, seed: int = 0) -> dict:
    """One deterministic synthetic row: targets are (input + 1) mod V on a random loss mask."""
    rng = np.random.default_rng([seed, int(index)])
    ids = rng.integers(0, V, size=T, dtype=np.int32)
    mask = (rng.random(T) < 0.7).astype(np.float32)
    mask[0] = 1.0
    return {"input_ids": ids, "targets": (ids + 1) % V, "loss_mask": mask,
            "feat": rng.normal(size=F).astype(np.float32)}


def make_batch(seed: int = 0, rows: int = B) -> dict:
    rows_ = [make_row(i, seed) for i in range(rows)]
    return {k: np.stack([r[k] for r in rows_]) for k in rows_[0]}


def data_iterator(seed: int = 0, rows: int = B):
    """Grain iterator over an endless shuffled stream of batches; has get_state / set_state."""
    ds = grain.MapDataset.range(1 << 20).shuffle(seed=seed).map(lambda i: make_row(i, seed)).batch(rows)
    return iter(ds.to_iter_dataset())


# The tests compile several steps; the XLA backend optimization level changes how fast the CPU code runs,
# not what it computes (up to rounding), and level 0 compiles about 3x faster on this 2-core machine.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
OPT_CFG = dict(lr=1e-2, warmup_steps=2, total_steps=50, final_lr_fraction=0.1, weight_decay=0.1, clip_norm=1.0)


@functools.lru_cache(maxsize=None)
def optimizer():
    """AdamW on the toy with the vision tower frozen (the router correction bias is never trained)."""
    return build_optimizer(dict(OPT_CFG, freeze=["vision"]))


@functools.lru_cache(maxsize=None)
def train_step(dropout: float = 0.0, grad_accum_steps: int = 1):
    """Jitted unsharded step, shared by the test modules of one pytest process (each compiles once)."""
    return make_train_step(make_loss_fn(dropout), optimizer(), grad_accum_steps=grad_accum_steps,
                           compiler_options=COMPILER_OPTIONS)
