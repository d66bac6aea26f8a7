"""Load balancing for MoE training: routing statistics, the aux-loss-free bias update, the DeepSeek-V3
sequence-wise auxiliary loss, and HF's Switch-style load_balancing_loss (for parity).

Shapes: N tokens, E routed experts, K experts per token, B sequences, L stacked layers (optional leading).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_BIAS_RATE = 1e-3        # DeepSeek-V3 bias update speed gamma
DEFAULT_SEQ_AUX_COEF = 1e-4     # coefficient for sequence_aux_loss (HF's router_aux_loss_coef default too)


def _token_mask(n: int, mask):
    return jnp.ones((n,), jnp.float32) if mask is None else mask.reshape(-1).astype(jnp.float32)


def routing_stats(logits, scores, experts, k: int, num_seqs: int, mask=None) -> dict:
    """Per-layer statistics. logits/scores [N, E] fp32, experts [N, K], mask [N] or None.
    load [E] int32 (routed copies per expert, real tokens only), seq_aux_loss (unweighted),
    lb_counts / lb_probs [E] and lb_rows: the sums HF's load_balancing_loss accumulates."""
    n, e = logits.shape
    m = _token_mask(n, mask)
    load = jnp.zeros((e,), jnp.int32).at[experts].add(jnp.broadcast_to((m > 0)[:, None], experts.shape)
                                                       .astype(jnp.int32))
    probs = jax.nn.softmax(logits, axis=-1)
    top = jax.lax.top_k(jax.lax.stop_gradient(probs), k)[1]
    lb_counts = jnp.zeros((e,), jnp.float32).at[top].add(jnp.broadcast_to(m[:, None], top.shape))
    return {"load": load,
            "seq_aux_loss": sequence_aux_loss(scores, experts, num_seqs, m),
            "lb_counts": lb_counts,
            "lb_probs": (probs * m[:, None]).sum(0),
            "lb_rows": m.sum()}


def sequence_aux_loss(scores, experts, num_seqs: int, mask=None):
    """DeepSeek-V3 sequence-wise balance loss sum_i f_i P_i, averaged over sequences (1.0 when perfectly
    balanced). scores [N, E] sigmoid affinities (no bias), experts [N, K]; tokens are num_seqs rows of
    N/num_seqs. f_i = E/(K T) * #tokens choosing i; P_i = mean_t s_ti / sum_j s_tj. Multiply by the
    coefficient (DEFAULT_SEQ_AUX_COEF) yourself."""
    n, e = scores.shape
    k = experts.shape[1]
    m = _token_mask(n, mask).reshape(num_seqs, -1, 1)
    chosen = jax.nn.one_hot(experts, e, dtype=jnp.float32).sum(1).reshape(num_seqs, -1, e)
    normalized = (scores / scores.sum(-1, keepdims=True)).reshape(num_seqs, -1, e)
    t = m.sum(1)                                                                  # [B, 1]
    safe_t = jnp.maximum(t, 1.0)
    f = e / (k * safe_t) * (chosen * m).sum(1)                                    # [B, E]
    p = (normalized * m).sum(1) / safe_t
    per_seq = (f * p).sum(-1)
    has_tokens = (t[:, 0] > 0).astype(jnp.float32)
    return (per_seq * has_tokens).sum() / jnp.maximum(has_tokens.sum(), 1.0)


def hf_load_balancing_loss(stats: dict):
    """HF `load_balancing_loss_func` (Switch-style, on softmax(router_logits)) from routing_stats of one
    layer or of several stacked along leading axes: E * sum_e (counts_e / rows) * (probs_e / rows), the
    counts, probs and rows summed over layers first, exactly as HF accumulates them."""
    counts, probs, rows = stats["lb_counts"], stats["lb_probs"], stats["lb_rows"]
    e = counts.shape[-1]
    counts, probs = counts.reshape(-1, e).sum(0), probs.reshape(-1, e).sum(0)
    rows = jnp.sum(rows)
    return e * jnp.sum((counts / rows) * (probs / rows))


def update_correction_bias(bias, load, rate: float = DEFAULT_BIAS_RATE):
    """Aux-loss-free balancing (DeepSeek-V3): bias + rate * sign(mean_load - load) over the expert axis.
    bias, load [..., E] (e.g. [L, E] for a layer stack). Kept outside the optimizer."""
    if bias.shape != load.shape:
        raise ValueError(f"bias shape {tuple(bias.shape)} != load shape {tuple(load.shape)}")
    load = load.astype(jnp.float32)
    step = jnp.sign(load.mean(-1, keepdims=True) - load)
    return (bias.astype(jnp.float32) + rate * step).astype(bias.dtype)


def load_imbalance(load):
    """max / mean of per-expert load over the last axis (1.0 is perfectly balanced)."""
    load = load.astype(jnp.float32)
    return load.max(-1) / jnp.maximum(load.mean(-1), 1e-9)
