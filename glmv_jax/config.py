"""Model configs: frozen dataclasses, released presets, and HF config.json conversion.

A `ModelConfig` holds a `VisionConfig` (the ViT + adapter) and a `TextConfig` (the dense or MoE GLM
decoder), the multimodal token ids, and the runtime knobs that never reach config.json (dtypes,
scan, remat, attention implementation). `from_hf_config` / `to_hf_config` convert to and from the
`config.json` of `Glm4vForConditionalGeneration` (model_type glm4v), `Glm4vMoeForConditionalGeneration`
(glm4v_moe) and `Glm46VForConditionalGeneration` (glm46v).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

MODEL_TYPES = ("glm4v", "glm4v_moe", "glm46v")
# glmv_jax/models/attention.py ACCEPTED (kept here so config.py imports nothing from models): "xla" is the
# earlier name of "einsum".
ATTENTION_IMPLS = ("auto", "einsum", "xla_sdpa", "cudnn", "splash", "xla")
REMAT_NAMES = ("none", "full", "minimal", "save_dots_except_mlp")    # "none" + models/layers.py REMAT_POLICIES


RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "attention")   # the experiment's model block sets


class ConfigError(ValueError):
    """A config (a model config, or an experiment config's key) that cannot run; the message names it."""


def restore_tuples(cls, values: Mapping) -> dict:
    """`values` for dataclass `cls` with lists turned back into tuples where the field is a tuple: a saved
    config.json (JSON has no tuples) and ConfigDict overrides hold lists, frozen configs must stay hashable."""
    hints = typing.get_type_hints(cls)
    return {k: tuple(v) if isinstance(v, list) and _is_tuple(hints.get(k)) else v for k, v in values.items()}


def _is_tuple(hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple(arg) for arg in typing.get_args(hint))
    return hint is tuple or origin is tuple


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 12
    out_hidden_size: int = 4096        # LLM width; also the width of the ViT block MLP
    intermediate_size: int = 13696     # only the merger's SwiGLU width
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    image_size: int = 336              # position table is (image_size / patch_size)^2 rows
    in_channels: int = 3
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ConfigError(f"vision head_dim {self.head_dim} must be divisible by 4 (2D rope)")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision image_size {self.image_size} not a multiple of patch_size {self.patch_size}")
        if self.spatial_merge_size != 2:
            raise ConfigError(f"spatial_merge_size must be 2 (the 2x2 downsample), got {self.spatial_merge_size}")


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int | None = None            # None: hidden_size // num_attention_heads (the dense model)
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    mrope_section: tuple[int, ...] = (8, 12, 12)
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 65536
    attention_bias: bool = True
    pad_token_id: int | None = 151329
    eos_token_id: tuple[int, ...] = (151329, 151336, 151338)
    # MoE (GLM-4.5-Air style); `moe=False` is the dense GLM-4 decoder.
    moe: bool = False
    moe_intermediate_size: int = 1408
    n_routed_experts: int = 128
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 1
    router_aux_loss_coef: float = 1e-4

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.dim_per_head * self.partial_rotary_factor)

    @property
    def rope_layout(self) -> str:
        """Pairing of rotary dims: dense GLM-4 interleaves (2j, 2j+1); the MoE decoder splits halves."""
        return "half" if self.moe else "interleaved"

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers) if self.moe else self.num_hidden_layers

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} not divisible by "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"text hidden_size {self.hidden_size} not divisible by num_attention_heads "
                              f"{self.num_attention_heads} (set head_dim explicitly)")
        if self.rotary_dim % 2 or self.rotary_dim > self.dim_per_head:
            raise ConfigError(f"rotary dim {self.rotary_dim} (head_dim {self.dim_per_head} x partial_rotary_factor "
                              f"{self.partial_rotary_factor}) must be even and at most head_dim")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.rotary_dim // 2:
            raise ConfigError(f"mrope_section {list(self.mrope_section)} must have 3 entries summing to the rotary "
                              f"half {self.rotary_dim // 2}")
        if self.moe:
            if self.n_routed_experts % self.n_group:
                raise ConfigError(f"n_routed_experts {self.n_routed_experts} not divisible by n_group {self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ConfigError(f"topk_group {self.topk_group} must be in [1, n_group={self.n_group}]")
            if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
                raise ConfigError(f"num_experts_per_tok {self.num_experts_per_tok} exceeds the experts in the "
                                  f"{self.topk_group} kept groups")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str = "glm4v"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 151343
    video_token_id: int = 151344
    image_start_token_id: int = 151339
    image_end_token_id: int = 151340
    video_start_token_id: int = 151341
    video_end_token_id: int = 151342
    # Runtime knobs (never written to config.json).
    dtype: str = "float32"          # compute dtype: "bfloat16" on accelerators
    param_dtype: str = "float32"    # master weights
    scan_layers: bool = True        # stack decoder layers / ViT blocks and scan over them
    remat: str = "none"             # none | full | minimal | save_dots_except_mlp
    attention: str = "auto"         # auto | einsum | xla_sdpa | cudnn | splash (models/attention.py); "xla" = einsum

    def validate(self) -> "ModelConfig":
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"unknown model_type {self.model_type!r}; expected one of {MODEL_TYPES}")
        self.vision.validate()
        self.text.validate()
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(f"vision out_hidden_size {self.vision.out_hidden_size} must equal text hidden_size "
                              f"{self.text.hidden_size}")
        ids = dict(image_token_id=self.image_token_id, video_token_id=self.video_token_id,
                   image_start_token_id=self.image_start_token_id, image_end_token_id=self.image_end_token_id,
                   video_start_token_id=self.video_start_token_id, video_end_token_id=self.video_end_token_id)
        for name, value in ids.items():
            if not 0 <= value < self.text.vocab_size:
                raise ConfigError(f"{name} {value} outside the vocabulary of size {self.text.vocab_size}")
        if self.remat not in REMAT_NAMES:
            raise ConfigError(f"unknown remat policy {self.remat!r}; expected one of {REMAT_NAMES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"unknown attention implementation {self.attention!r}; expected one of {ATTENTION_IMPLS}")
        return self

    def replace(self, **kw) -> "ModelConfig":
        return replace(self, **kw)


# ----------------------------------------------------------------------------------------------
# Presets. Released numbers: docs/models.md section 2 (read real ones from config.json).

_MOE_TEXT = TextConfig(num_hidden_layers=46, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
                       intermediate_size=10944, moe=True)
_MOE_TOKENS = dict(image_token_id=151363, video_token_id=151364)


def tiny(moe: bool = False) -> ModelConfig:
    """The parity-test config (docs/models.md sections 2 and 12): ~150k params, runs in milliseconds on CPU."""
    vision = VisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                          patch_size=4, image_size=32)
    text = TextConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      mrope_section=(1, 2, 1), pad_token_id=0, eos_token_id=(1,))
    if moe:
        text = replace(text, moe=True, head_dim=16, num_hidden_layers=3, moe_intermediate_size=32,
                       n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                       first_k_dense_replace=1)
    return ModelConfig(model_type="glm4v_moe" if moe else "glm4v", vision=vision, text=text,
                       image_token_id=250, video_token_id=251, image_start_token_id=252, image_end_token_id=253,
                       video_start_token_id=254, video_end_token_id=255).validate()


def glm41v_9b() -> ModelConfig:
    """GLM-4.1V-9B-Thinking / -Base: dense GLM-4 decoder, 40 layers."""
    text = TextConfig(eos_token_id=(151329, 151336, 151338, 151348))
    return ModelConfig(model_type="glm4v", text=text).validate()


def glm45v() -> ModelConfig:
    """GLM-4.5V: GLM-4.5-Air MoE decoder (106B total, 12B active)."""
    return ModelConfig(model_type="glm4v_moe", vision=VisionConfig(intermediate_size=10944), text=_MOE_TEXT,
                       **_MOE_TOKENS).validate()


def glm46v() -> ModelConfig:
    """GLM-4.6V: the 4.5V MoE architecture with 128K context (check rope_theta in the checkpoint)."""
    return ModelConfig(model_type="glm46v", vision=VisionConfig(intermediate_size=10944),
                       text=replace(_MOE_TEXT, max_position_embeddings=131072), **_MOE_TOKENS).validate()


def glm46v_flash() -> ModelConfig:
    """GLM-4.6V-Flash: the 9B dense architecture with 128K context and the 4.5V token ids."""
    return ModelConfig(model_type="glm46v", text=TextConfig(max_position_embeddings=131072),
                       **_MOE_TOKENS).validate()


PRESETS = {"tiny": tiny, "tiny_moe": lambda: tiny(moe=True), "glm41v_9b": glm41v_9b, "glm45v": glm45v,
           "glm46v": glm46v, "glm46v_flash": glm46v_flash}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------------------------
# HF config.json <-> ModelConfig

_VISION_KEYS = [f.name for f in dataclasses.fields(VisionConfig) if f.name != "rope_theta"]
_TOKEN_KEYS = ["image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
               "video_start_token_id", "video_end_token_id"]
_TEXT_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "pad_token_id"]
_MOE_KEYS = ["moe_intermediate_size", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
             "topk_group", "norm_topk_prob", "routed_scaling_factor", "first_k_dense_replace",
             "router_aux_loss_coef"]


def _rope_fields(text: dict[str, Any], default_partial: float | None) -> dict[str, Any]:
    """Reads rope settings from either the legacy keys (rope_theta, partial_rotary_factor, rope_scaling)
    or transformers v5's folded `rope_parameters`."""
    params = dict(text.get("rope_scaling") or {})
    params.update(text.get("rope_parameters") or {})
    theta = params.get("rope_theta", text.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", text.get("partial_rotary_factor", default_partial))
    if partial is None:
        raise ConfigError("text config has no partial_rotary_factor (released GLM-V configs carry 0.5); "
                          "HF would silently use full-width rotary and crash in the M-RoPE split")
    section = params.get("mrope_section", [8, 12, 12])
    return dict(rope_theta=float(theta), partial_rotary_factor=float(partial), mrope_section=tuple(section))


def _text_fields(hf: Mapping[str, Any]) -> Mapping[str, Any]:
    """The text decoder's fields: `text_config`, or the top level in the flat config.json of the July-2025
    GLM-4.1V-9B releases, which put the text fields there next to vision_config (transformers passes top-level
    keys to the text config when text_config is absent). Those flat files carry partial_rotary_factor 0.5,
    rope_theta and rope_scaling.mrope_section at the top level, so nothing needs defaulting here."""
    if hf.get("text_config") is not None:
        return hf["text_config"]
    return {k: v for k, v in hf.items() if k not in ("model_type", "vision_config")}


def from_hf_config(hf: dict[str, Any] | str | Path) -> ModelConfig:
    """Builds a ModelConfig from a config.json dict (or its path, or the directory holding it)."""
    if not isinstance(hf, dict):
        path = Path(hf)
        path = path / "config.json" if path.is_dir() else path
        if not path.exists():
            raise ConfigError(f"no config.json at {path}")
        hf = json.loads(path.read_text())
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"unsupported model_type {model_type!r} in config.json; expected one of {MODEL_TYPES}")
    text, vision = dict(_text_fields(hf)), dict(hf.get("vision_config") or {})
    text_type = text.get("model_type", "glm4v_moe_text" if model_type == "glm4v_moe" else "glm4v_text")
    if text_type not in ("glm4v_text", "glm4v_moe_text"):
        raise ConfigError(f"unsupported text_config.model_type {text_type!r}")
    moe = text_type == "glm4v_moe_text"
    text_kw = {k: text[k] for k in _TEXT_KEYS if k in text}
    text_kw.update(_rope_fields(text, 0.5 if moe else None))
    if moe:
        text_kw.update({k: text[k] for k in _MOE_KEYS if k in text})
        # HF's Glm4vMoeTextConfig: attention_bias defaults to True; a missing head_dim means hidden / heads.
        text_kw.update(moe=True, head_dim=text.get("head_dim"), attention_bias=bool(text.get("attention_bias", True)))
    eos = text.get("eos_token_id", hf.get("eos_token_id"))
    if eos is not None:
        text_kw["eos_token_id"] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    vision_kw = {k: vision[k] for k in _VISION_KEYS if k in vision}
    tokens = {k: hf[k] for k in _TOKEN_KEYS if k in hf}
    base = TextConfig(moe=moe, head_dim=128 if moe else None, intermediate_size=10944 if moe else 13696)
    return ModelConfig(model_type=model_type, vision=replace(VisionConfig(), **vision_kw),
                       text=replace(base, **text_kw), **tokens).validate()


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """The config.json dict that transformers' `from_pretrained` reads back into the same model."""
    v, t = config.vision, config.text
    vision = {k: getattr(v, k) for k in _VISION_KEYS}
    vision.update(model_type="glm4v_moe_vision" if config.model_type == "glm4v_moe" else "glm4v_vision",
                  hidden_act="silu", attention_bias=False)
    rope = {"rope_type": "default", "rope_theta": t.rope_theta, "partial_rotary_factor": t.partial_rotary_factor,
            "mrope_section": list(t.mrope_section)}
    text = {k: getattr(t, k) for k in _TEXT_KEYS}
    text.update(model_type="glm4v_moe_text" if t.moe else "glm4v_text", hidden_act="silu",
                rope_parameters=rope, rope_theta=t.rope_theta, partial_rotary_factor=t.partial_rotary_factor,
                eos_token_id=list(t.eos_token_id), tie_word_embeddings=False, attention_dropout=0.0)
    if t.moe:
        text.update({k: getattr(t, k) for k in _MOE_KEYS})
        text.update(head_dim=t.dim_per_head, attention_bias=t.attention_bias)
    archs = {"glm4v": "Glm4vForConditionalGeneration", "glm4v_moe": "Glm4vMoeForConditionalGeneration",
             "glm46v": "Glm46VForConditionalGeneration"}
    out = {"architectures": [archs[config.model_type]], "model_type": config.model_type,
           "text_config": text, "vision_config": vision, "tie_word_embeddings": False}
    out.update({k: getattr(config, k) for k in _TOKEN_KEYS})
    return out
