"""The HF key table: every checkpoint tensor <-> its place in the parameter tree (models/PARAM_TREE.md).

An `Entry` names one HF tensor, its HF shape, the parameter leaves it fills (`Target`: a path such as
"text/moe_layers/attn/q/kernel" and an index into the leaf's stacked leading axes) and, per target, a
`View` (views.py): where the target's part lies in the HF tensor, which gives the whole-tensor transforms
both ways and the boxes a per-host load or save reads and writes.
`param_specs(config)` lists every leaf: its stacked axes, its per-slice shape and whether it stays fp32.

Two layouts of the MoE experts exist: "per_expert" (`mlp.experts.{e}.{gate,up,down}_proj.weight`, the
hub layout and what glm4v_moe's save_pretrained writes) and "fused" (`mlp.experts.gate_up_proj`
(E, 2I, D), gate rows first, and `mlp.experts.down_proj` (E, D, I): HF's in-memory state_dict, and what
glm46v's save_pretrained writes, since transformers registers the per-expert conversion only for glm4v_moe).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from glmv_jax.config import ModelConfig
from glmv_jax.convert.views import View, slices, view

VISION, TEXT = "model.visual.", "model.language_model."
EXPERT_LAYOUTS = ("per_expert", "fused")


class ConversionError(ValueError):
    """A checkpoint or parameter tree that cannot be converted; the message names the key or file."""


def listing(items: list[str], limit: int = 12) -> str:
    """The first `limit` items joined with '; ', then how many more."""
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


@dataclass(frozen=True)
class LeafSpec:
    stack: tuple[int, ...]       # leading stacked axes that Target.index addresses (layers, experts)
    slice: tuple[int, ...]       # shape of one slice
    fp32: bool = False           # kept float32 whatever the requested dtype (router weight and bias)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack + self.slice


@dataclass(frozen=True)
class Target:
    path: str
    index: tuple[int, ...] = ()


@dataclass(frozen=True)
class Entry:
    key: str
    shape: tuple[int, ...]
    targets: tuple[Target, ...]
    views: tuple[View, ...]      # one per target: where its part lies in the HF tensor (views.py)

    def to_params(self, array: np.ndarray) -> tuple[np.ndarray, ...]:
        """HF array -> one part per target."""
        return tuple(v.to_part(array[slices(v.select)]) for v in self.views)

    def to_hf(self, *parts: np.ndarray) -> np.ndarray:
        """One part per target -> the HF array."""
        out = np.empty(self.shape, np.result_type(*parts))
        for v, part in zip(self.views, parts):
            out[slices(v.select)] = v.to_region(part)
        return out


def default_expert_layout(config: ModelConfig) -> str:
    """The layout that transformers' from_pretrained reads for this model_type (see module docstring)."""
    return "fused" if config.model_type == "glm46v" else "per_expert"


# The text decoder's prefixes across GLM / GLM-V exports; MTP (next-n) layers are numbered after the decoder
# layers (`...layers.{n}.` with n >= num_hidden_layers) or live in a module of their own
# (`mtp.`, `nextn.`, `mtp_layers.`, `nextn_layers.`).
_TEXT_PREFIX = r"(?:model\.language_model\.|language_model\.model\.|language_model\.|model\.)?"
_MTP_LAYER = re.compile(_TEXT_PREFIX + r"layers\.(\d+)\.")
_MTP_MODULE = re.compile(_TEXT_PREFIX + r"(?:mtp|nextn)(?:_layers)?\.")


def is_mtp_key(key: str, config: ModelConfig) -> bool:
    """Whether `key` belongs to an MTP / next-n layer, which the model does not use."""
    m = _MTP_LAYER.match(key)
    return bool(m and int(m.group(1)) >= config.text.num_hidden_layers) or bool(_MTP_MODULE.match(key))


# ----------------------------------------------------------------------------------------------
# Leaves

def _stacks(config: ModelConfig) -> list[tuple[str, int, int, bool]]:
    """Text layer stacks as (name, first HF layer, count, is_moe); empty stacks are left out."""
    t = config.text
    k = t.num_dense_layers
    stacks = [("layers", 0, k, False), ("moe_layers", k, t.num_hidden_layers - k, True)]
    return [s for s in stacks if s[2] > 0]


def param_specs(config: ModelConfig) -> dict[str, LeafSpec]:
    """Every leaf of the parameter tree, keyed by its '/'-joined path."""
    v, t = config.vision, config.text
    Dv, Nv, Hv, O, L = v.hidden_size, v.num_heads, v.head_dim, v.out_hidden_size, v.depth
    D, N, K, H, V = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.dim_per_head, t.vocab_size
    s = {
        "vision/patch_embed/kernel": LeafSpec((), (v.patch_dim, Dv)),
        "vision/patch_embed/bias": LeafSpec((), (Dv,)),
        "vision/pos_embed/embedding": LeafSpec((), (v.num_positions, Dv)),
        "vision/post_conv_norm/scale": LeafSpec((), (Dv,)),
        "vision/blocks/norm1/scale": LeafSpec((L,), (Dv,)),
        "vision/blocks/norm2/scale": LeafSpec((L,), (Dv,)),
        "vision/blocks/attn/qkv/kernel": LeafSpec((L,), (Dv, 3, Nv, Hv)),
        "vision/blocks/attn/out/kernel": LeafSpec((L,), (Nv, Hv, Dv)),
        "vision/blocks/mlp/gate/kernel": LeafSpec((L,), (Dv, O)),
        "vision/blocks/mlp/up/kernel": LeafSpec((L,), (Dv, O)),
        "vision/blocks/mlp/down/kernel": LeafSpec((L,), (O, Dv)),
        "vision/post_norm/scale": LeafSpec((), (Dv,)),
        "vision/downsample/kernel": LeafSpec((), (4 * Dv, O)),
        "vision/downsample/bias": LeafSpec((), (O,)),
        "vision/merger/proj/kernel": LeafSpec((), (O, O)),
        "vision/merger/norm/scale": LeafSpec((), (O,)),
        "vision/merger/norm/bias": LeafSpec((), (O,)),
        "vision/merger/gate/kernel": LeafSpec((), (O, v.intermediate_size)),
        "vision/merger/up/kernel": LeafSpec((), (O, v.intermediate_size)),
        "vision/merger/down/kernel": LeafSpec((), (v.intermediate_size, O)),
        "text/embed/embedding": LeafSpec((), (V, D)),
        "text/final_norm/scale": LeafSpec((), (D,)),
        "lm_head/kernel": LeafSpec((), (D, V)),
    }
    for name, _, n, is_moe in _stacks(config):
        p = f"text/{name}/"
        s[p + "attn_norm/scale"] = s[p + "mlp_norm/scale"] = LeafSpec((n,), (D,))
        if not t.moe:
            s[p + "attn_out_norm/scale"] = s[p + "mlp_out_norm/scale"] = LeafSpec((n,), (D,))
        for proj, heads in (("q", N), ("k", K), ("v", K)):
            s[p + f"attn/{proj}/kernel"] = LeafSpec((n,), (D, heads, H))
            if t.attention_bias:
                s[p + f"attn/{proj}/bias"] = LeafSpec((n,), (heads, H))
        s[p + "attn/o/kernel"] = LeafSpec((n,), (N, H, D))
        if not is_moe:
            F = t.intermediate_size
            s[p + "mlp/gate/kernel"] = s[p + "mlp/up/kernel"] = LeafSpec((n,), (D, F))
            s[p + "mlp/down/kernel"] = LeafSpec((n,), (F, D))
            continue
        E, F, Fs = t.n_routed_experts, t.moe_intermediate_size, t.moe_intermediate_size * t.n_shared_experts
        s[p + "moe/router/kernel"] = LeafSpec((n,), (D, E), fp32=True)
        s[p + "moe/router/correction_bias"] = LeafSpec((n,), (E,), fp32=True)
        s[p + "moe/experts/gate"] = s[p + "moe/experts/up"] = LeafSpec((n, E), (D, F))
        s[p + "moe/experts/down"] = LeafSpec((n, E), (F, D))
        s[p + "moe/shared/gate/kernel"] = s[p + "moe/shared/up/kernel"] = LeafSpec((n,), (D, Fs))
        s[p + "moe/shared/down/kernel"] = LeafSpec((n,), (Fs, D))
    return s


# ----------------------------------------------------------------------------------------------
# Transforms (HF Linear weights are (out, in); kernels are (in, out) with heads split out)

def _identity(hf_shape):
    return (view(hf_shape),)


def _linear(in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
    """(prod(out), prod(in)) weight <-> (*in_shape, *out_shape) kernel."""
    n_in, n_out = len(in_shape), len(out_shape)
    hf = (int(np.prod(out_shape)), int(np.prod(in_shape)))
    return (view(hf, split=(out_shape, in_shape), perm=tuple(range(n_out, n_out + n_in)) + tuple(range(n_out))),)


def _reshape(shape: tuple[int, ...], hf_shape: tuple[int, ...]):
    return (view(hf_shape, split=(shape,)),)


def _conv3d(hf_shape):
    """Conv3d patch embed (Dv, C, T, P, P) <-> (C*T*P*P, Dv): input rows are laid out (c, t, py, px)."""
    return (view(hf_shape, perm=(1, 2, 3, 4, 0), merge=(4, 1)),)


def _conv2d(hf_shape):
    """Conv2d downsample (O, Dv, 2, 2) <-> (2*2*Dv, O): the 4 tokens of a block concatenated channel-last."""
    return (view(hf_shape, perm=(2, 3, 1, 0), merge=(3, 1)),)


def _split_rows(f: int, d: int):
    """Fused [gate; up] (2F, D) <-> gate (D, F), up (D, F)."""
    return tuple(view((2 * f, d), select=((r, r + f), (0, d)), perm=(1, 0)) for r in (0, f))


def _fused_gate_up(e: int, f: int, d: int):
    """Fused experts (E, 2F, D), gate rows first <-> gate (E, D, F), up (E, D, F)."""
    return tuple(view((e, 2 * f, d), select=((0, e), (r, r + f), (0, d)), perm=(0, 2, 1)) for r in (0, f))


def _batched_transpose(hf_shape):
    return (view(hf_shape, perm=(0, 2, 1)),)


# ----------------------------------------------------------------------------------------------
# The table

class _Table:
    def __init__(self):
        self.entries: list[Entry] = []

    def add(self, key, shape, targets, views):
        targets = tuple(t if isinstance(t, Target) else Target(*t) for t in targets)
        self.entries.append(Entry(key, tuple(int(d) for d in shape), targets, tuple(views)))

    def one(self, key, shape, path, index=(), transform=None):
        self.add(key, shape, [(path, index)], transform or _identity(shape))


def _vision_entries(tb: _Table, config: ModelConfig) -> None:
    v = config.vision
    Dv, Nv, Hv, O, I = v.hidden_size, v.num_heads, v.head_dim, v.out_hidden_size, v.intermediate_size
    conv3d = (Dv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    conv2d = (O, Dv, v.spatial_merge_size, v.spatial_merge_size)
    p = VISION
    tb.one(p + "patch_embed.proj.weight", conv3d, "vision/patch_embed/kernel", transform=_conv3d(conv3d))
    tb.one(p + "patch_embed.proj.bias", (Dv,), "vision/patch_embed/bias")
    tb.one(p + "embeddings.position_embedding.weight", (v.num_positions, Dv), "vision/pos_embed/embedding")
    tb.one(p + "post_conv_layernorm.weight", (Dv,), "vision/post_conv_norm/scale")
    for l in range(v.depth):
        b, q = f"{p}blocks.{l}.", "vision/blocks/"
        tb.one(b + "norm1.weight", (Dv,), q + "norm1/scale", (l,))
        tb.one(b + "norm2.weight", (Dv,), q + "norm2/scale", (l,))
        tb.one(b + "attn.qkv.weight", (3 * Dv, Dv), q + "attn/qkv/kernel", (l,), _linear((Dv,), (3, Nv, Hv)))
        tb.one(b + "attn.proj.weight", (Dv, Dv), q + "attn/out/kernel", (l,), _linear((Nv, Hv), (Dv,)))
        for proj in ("gate", "up"):
            tb.one(b + f"mlp.{proj}_proj.weight", (O, Dv), q + f"mlp/{proj}/kernel", (l,), _linear((Dv,), (O,)))
        tb.one(b + "mlp.down_proj.weight", (Dv, O), q + "mlp/down/kernel", (l,), _linear((O,), (Dv,)))
    tb.one(p + "post_layernorm.weight", (Dv,), "vision/post_norm/scale")
    tb.one(p + "downsample.weight", conv2d, "vision/downsample/kernel", transform=_conv2d(conv2d))
    tb.one(p + "downsample.bias", (O,), "vision/downsample/bias")
    tb.one(p + "merger.proj.weight", (O, O), "vision/merger/proj/kernel", transform=_linear((O,), (O,)))
    tb.one(p + "merger.post_projection_norm.weight", (O,), "vision/merger/norm/scale")
    tb.one(p + "merger.post_projection_norm.bias", (O,), "vision/merger/norm/bias")
    for proj in ("gate", "up"):
        tb.one(p + f"merger.{proj}_proj.weight", (I, O), f"vision/merger/{proj}/kernel", transform=_linear((O,), (I,)))
    tb.one(p + "merger.down_proj.weight", (O, I), "vision/merger/down/kernel", transform=_linear((I,), (O,)))


def _attention_entries(tb: _Table, config: ModelConfig, b: str, q: str, i: int) -> None:
    t = config.text
    D, N, K, H = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.dim_per_head
    for proj, heads in (("q", N), ("k", K), ("v", K)):
        tb.one(b + f"self_attn.{proj}_proj.weight", (heads * H, D), q + f"attn/{proj}/kernel", (i,),
               _linear((D,), (heads, H)))
        if t.attention_bias:
            tb.one(b + f"self_attn.{proj}_proj.bias", (heads * H,), q + f"attn/{proj}/bias", (i,),
                   _reshape((heads, H), (heads * H,)))
    tb.one(b + "self_attn.o_proj.weight", (D, N * H), q + "attn/o/kernel", (i,), _linear((N, H), (D,)))
    tb.one(b + "input_layernorm.weight", (D,), q + "attn_norm/scale", (i,))
    tb.one(b + "post_attention_layernorm.weight", (D,), q + "mlp_norm/scale", (i,))
    if not t.moe:
        tb.one(b + "post_self_attn_layernorm.weight", (D,), q + "attn_out_norm/scale", (i,))
        tb.one(b + "post_mlp_layernorm.weight", (D,), q + "mlp_out_norm/scale", (i,))


def _moe_entries(tb: _Table, config: ModelConfig, b: str, q: str, i: int, layout: str) -> None:
    t = config.text
    D, E, F, Fs = t.hidden_size, t.n_routed_experts, t.moe_intermediate_size, t.moe_intermediate_size * t.n_shared_experts
    m = b + "mlp."
    tb.one(m + "gate.weight", (E, D), q + "moe/router/kernel", (i,), _linear((D,), (E,)))
    tb.one(m + "gate.e_score_correction_bias", (E,), q + "moe/router/correction_bias", (i,))
    if layout == "fused":
        tb.add(m + "experts.gate_up_proj", (E, 2 * F, D),
               [(q + "moe/experts/gate", (i,)), (q + "moe/experts/up", (i,))], _fused_gate_up(E, F, D))
        tb.one(m + "experts.down_proj", (E, D, F), q + "moe/experts/down", (i,), _batched_transpose((E, D, F)))
    else:
        for e in range(E):
            x = f"{m}experts.{e}."
            for proj in ("gate", "up"):
                tb.one(x + f"{proj}_proj.weight", (F, D), q + f"moe/experts/{proj}", (i, e), _linear((D,), (F,)))
            tb.one(x + "down_proj.weight", (D, F), q + "moe/experts/down", (i, e), _linear((F,), (D,)))
    for proj in ("gate", "up"):
        tb.one(m + f"shared_experts.{proj}_proj.weight", (Fs, D), q + f"moe/shared/{proj}/kernel", (i,),
               _linear((D,), (Fs,)))
    tb.one(m + "shared_experts.down_proj.weight", (D, Fs), q + "moe/shared/down/kernel", (i,), _linear((Fs,), (D,)))


def _text_entries(tb: _Table, config: ModelConfig, layout: str) -> None:
    t = config.text
    D, V, F = t.hidden_size, t.vocab_size, t.intermediate_size
    tb.one(TEXT + "embed_tokens.weight", (V, D), "text/embed/embedding")
    for name, first, n, is_moe in _stacks(config):
        q = f"text/{name}/"
        for i in range(n):
            b = f"{TEXT}layers.{first + i}."
            _attention_entries(tb, config, b, q, i)
            if is_moe:
                _moe_entries(tb, config, b, q, i, layout)
            elif not t.moe:   # the dense decoder fuses gate and up
                tb.add(b + "mlp.gate_up_proj.weight", (2 * F, D),
                       [(q + "mlp/gate/kernel", (i,)), (q + "mlp/up/kernel", (i,))], _split_rows(F, D))
                tb.one(b + "mlp.down_proj.weight", (D, F), q + "mlp/down/kernel", (i,), _linear((F,), (D,)))
            else:             # the MoE decoder's leading dense layers keep them apart
                for proj in ("gate", "up"):
                    tb.one(b + f"mlp.{proj}_proj.weight", (F, D), q + f"mlp/{proj}/kernel", (i,), _linear((D,), (F,)))
                tb.one(b + "mlp.down_proj.weight", (D, F), q + "mlp/down/kernel", (i,), _linear((F,), (D,)))
    tb.one(TEXT + "norm.weight", (D,), "text/final_norm/scale")
    tb.one("lm_head.weight", (V, D), "lm_head/kernel", transform=_linear((D,), (V,)))


def key_table(config: ModelConfig, expert_layout: str | None = None) -> list[Entry]:
    """Every HF tensor of `config`'s checkpoint, in save order (vision, text layers, final norm, lm_head)."""
    layout = expert_layout or default_expert_layout(config)
    if layout not in EXPERT_LAYOUTS:
        raise ConversionError(f"unknown expert layout {layout!r}; expected one of {EXPERT_LAYOUTS}")
    tb = _Table()
    _vision_entries(tb, config)
    _text_entries(tb, config, layout)
    return tb.entries


def lookup_table(config: ModelConfig) -> dict[str, Entry]:
    """HF key -> Entry for every key a checkpoint of `config` may hold (both expert layouts)."""
    table = {e.key: e for e in key_table(config, "per_expert")}
    if config.text.moe:
        table.update({e.key: e for e in key_table(config, "fused")})
    return table
