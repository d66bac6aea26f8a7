"""Analytic model FLOPs (multiply-add = 2 FLOPs) for MFU: matmuls and attention, nothing else.

Causal attention counts the lower triangle only (the useful work); ViT attention counts each image or
frame's own square. Norms, softmax, rope and activations are left out, as MFU conventions do.
"""

from __future__ import annotations

from typing import Sequence

from glmv_jax.config import ModelConfig


def vision_flops(config: ModelConfig, grids: Sequence[Sequence[int]]) -> float:
    """Forward FLOPs of the ViT + adapter for images/frames with (t, h, w) patch grids."""
    v = config.vision
    d, o, inter = v.hidden_size, v.out_hidden_size, v.intermediate_size
    patches = sum(t * h * w for t, h, w in grids)
    per_patch = v.patch_dim * d + v.depth * (4 * d * d + 3 * d * o)
    attention = sum(t * v.depth * 2 * (h * w) ** 2 * d for t, h, w in grids)   # QK^T and PV per frame
    merged = patches // v.spatial_merge_size ** 2
    per_merged = 4 * d * o + o * o + 3 * o * inter
    return 2.0 * (patches * per_patch + merged * per_merged) + 2.0 * attention


def text_flops(config: ModelConfig, batch: int, seq_len: int, logits_positions: int | None = None) -> float:
    """Forward FLOPs of the decoder over [batch, seq_len] tokens; lm_head on `logits_positions` per row."""
    t = config.text
    d, h = t.hidden_size, t.dim_per_head
    n, k = t.num_attention_heads, t.num_key_value_heads
    attn_proj = d * n * h * 2 + 2 * d * k * h
    dense_mlp = 3 * d * t.intermediate_size
    moe_mlp = 3 * d * t.moe_intermediate_size * (t.num_experts_per_tok + t.n_shared_experts) + d * t.n_routed_experts
    layers_dense = t.num_dense_layers
    layers_moe = t.num_hidden_layers - layers_dense
    per_token = t.num_hidden_layers * attn_proj + layers_dense * dense_mlp + layers_moe * moe_mlp
    causal_pairs = seq_len * (seq_len + 1) / 2
    attention = t.num_hidden_layers * 2 * causal_pairs * n * h          # QK^T and PV
    logits = (seq_len if logits_positions is None else logits_positions) * d * t.vocab_size
    return 2.0 * batch * (seq_len * per_token + attention + logits)


def forward_flops(config: ModelConfig, batch: int, seq_len: int, grids_per_row: Sequence[Sequence[int]] = (),
                  logits_positions: int | None = None) -> float:
    return text_flops(config, batch, seq_len, logits_positions) + batch * vision_flops(config, grids_per_row)
