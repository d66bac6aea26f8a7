"""Shared fixtures for the model tests: the tiny config, its HF oracle model and the converted params."""

from __future__ import annotations

import numpy as np
import pytest

from glmv_jax.config import ModelConfig, tiny
from glmv_jax.convert.hf import load_pretrained
from tests.hf_oracle import build_hf_model


def _stack(sd, fmt, count, fn=lambda w: w):
    return np.stack([fn(sd[fmt.format(i)]) for i in range(count)])


def reference_params(state_dict: dict[str, np.ndarray], config: ModelConfig) -> dict:
    """PARAM_TREE.md mapping written independently of the converter (dense decoder only)."""
    v, t = config.vision, config.text
    dv, nv, hv, o = v.hidden_size, v.num_heads, v.head_dim, v.out_hidden_size
    d, n, k, h, f = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.dim_per_head, t.intermediate_size
    sd = {key: np.asarray(val, np.float32) for key, val in state_dict.items()}
    V, L, nb, nl = "model.visual.", "model.language_model.", v.depth, t.num_hidden_layers
    blk = lambda name, fn=lambda w: w.T: _stack(sd, V + "blocks.{}." + name, nb, fn)
    lay = lambda name, fn=lambda w: w.T: _stack(sd, L + "layers.{}." + name, nl, fn)
    scale = lambda w: w
    vision = {
        "patch_embed": {"kernel": sd[V + "patch_embed.proj.weight"].reshape(dv, -1).T,
                        "bias": sd[V + "patch_embed.proj.bias"]},
        "pos_embed": {"embedding": sd[V + "embeddings.position_embedding.weight"]},
        "post_conv_norm": {"scale": sd[V + "post_conv_layernorm.weight"]},
        "blocks": {"norm1": {"scale": blk("norm1.weight", scale)}, "norm2": {"scale": blk("norm2.weight", scale)},
                   "attn": {"qkv": {"kernel": blk("attn.qkv.weight", lambda w: w.T.reshape(dv, 3, nv, hv))},
                            "out": {"kernel": blk("attn.proj.weight", lambda w: w.T.reshape(nv, hv, dv))}},
                   "mlp": {p: {"kernel": blk(f"mlp.{p}_proj.weight")} for p in ("gate", "up", "down")}},
        "post_norm": {"scale": sd[V + "post_layernorm.weight"]},
        "downsample": {"kernel": sd[V + "downsample.weight"].transpose(2, 3, 1, 0).reshape(4 * dv, o),
                       "bias": sd[V + "downsample.bias"]},
        "merger": {"proj": {"kernel": sd[V + "merger.proj.weight"].T},
                   "norm": {"scale": sd[V + "merger.post_projection_norm.weight"],
                            "bias": sd[V + "merger.post_projection_norm.bias"]},
                   **{p: {"kernel": sd[V + f"merger.{p}_proj.weight"].T} for p in ("gate", "up", "down")}},
    }
    attn = {name: {"kernel": lay(f"self_attn.{name}_proj.weight", lambda w, m=m: w.T.reshape(d, m, h)),
                   "bias": lay(f"self_attn.{name}_proj.bias", lambda b, m=m: b.reshape(m, h))}
            for name, m in (("q", n), ("k", k), ("v", k))}
    attn["o"] = {"kernel": lay("self_attn.o_proj.weight", lambda w: w.T.reshape(n, h, d))}
    layers = {
        "attn_norm": {"scale": lay("input_layernorm.weight", scale)},
        "attn_out_norm": {"scale": lay("post_self_attn_layernorm.weight", scale)},
        "mlp_norm": {"scale": lay("post_attention_layernorm.weight", scale)},
        "mlp_out_norm": {"scale": lay("post_mlp_layernorm.weight", scale)},
        "attn": attn,
        "mlp": {"gate": {"kernel": lay("mlp.gate_up_proj.weight", lambda w: w[:f].T)},
                "up": {"kernel": lay("mlp.gate_up_proj.weight", lambda w: w[f:].T)},
                "down": {"kernel": lay("mlp.down_proj.weight")}},
    }
    text = {"embed": {"embedding": sd[L + "embed_tokens.weight"]}, "layers": layers,
            "final_norm": {"scale": sd[L + "norm.weight"]}}
    return {"vision": vision, "text": text, "lm_head": {"kernel": sd["lm_head.weight"].T}}


def pad_prompts(prompts: list[dict], padding: str) -> dict:
    """Pads several multimodal_inputs prompts into one batch (left or right), grids in row order."""
    length = max(p["input_ids"].shape[1] for p in prompts)
    out = {k: [] for k in ("input_ids", "mm_token_type_ids", "attention_mask")}
    for p in prompts:
        extra = length - p["input_ids"].shape[1]
        widths = [(0, 0), (extra, 0) if padding == "left" else (0, extra)]
        for key in out:
            out[key].append(np.pad(p[key], widths))
    batch = {k: np.concatenate(v) for k, v in out.items()}
    for grid, pixels in (("image_grid_thw", "pixel_values"), ("video_grid_thw", "pixel_values_videos")):
        found = [p for p in prompts if grid in p]
        if found:
            batch[grid] = np.concatenate([p[grid] for p in found])
            batch[pixels] = np.concatenate([p[pixels] for p in found])
    return batch


@pytest.fixture(scope="session")
def config() -> ModelConfig:
    return tiny()


@pytest.fixture(scope="session")
def hf_model(config):
    return build_hf_model(config, seed=0)


@pytest.fixture(scope="session")
def params(config, hf_model, tmp_path_factory):
    """The HF checkpoint written by save_pretrained and read back by our converter."""
    path = tmp_path_factory.mktemp("tiny_glm4v")
    hf_model.save_pretrained(str(path))
    loaded_config, loaded = load_pretrained(path)
    assert loaded_config.text == config.text and loaded_config.vision == config.vision
    return loaded
