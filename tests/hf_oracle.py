"""HF transformers (PyTorch, CPU, fp32) as the parity oracle: tiny models and multimodal inputs.

`build_hf_model(config)` builds the HF model for one of our ModelConfigs through `to_hf_config`, with
weights re-drawn at O(1) scale (docs/models.md section 12: at the default 0.02 init attention is nearly
uniform and rope/ordering bugs hide). `save_hf_model` writes a `save_pretrained` directory that
`load_pretrained` reads. `multimodal_inputs` builds processor-shaped inputs (ids, token types, grids,
patch rows) for any mix of images and videos. `with_video_stand_in(Glm4vProcessor)` is HF's processor
without torchvision.
"""

from __future__ import annotations

import numpy as np
import torch

from glmv_jax.config import ModelConfig, to_hf_config


def with_video_stand_in(cls):
    """HF's Glm4vProcessor / Glm46VProcessor accepting a stand-in video processor (an object carrying
    `merge_size`): HF's video processor needs torchvision."""
    class WithVideoStandIn(cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor":
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)
    return WithVideoStandIn


def hf_classes(model_type: str):
    import transformers as tf
    return {"glm4v": (tf.Glm4vConfig, tf.Glm4vForConditionalGeneration),
            "glm4v_moe": (tf.Glm4vMoeConfig, tf.Glm4vMoeForConditionalGeneration),
            "glm46v": (tf.Glm46VConfig, tf.Glm46VForConditionalGeneration)}[model_type]


def build_hf_model(config: ModelConfig, seed: int = 0, scale: float = 0.5):
    """HF model for `config` with every weight ~ N(0, scale^2)/sqrt(fan_in)-ish: O(1) activations."""
    config_cls, model_cls = hf_classes(config.model_type)
    hf_config = config_cls(**{k: v for k, v in to_hf_config(config).items() if k != "architectures"})
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(hf_config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if p.dtype not in (torch.float32, torch.float64) or "inv_freq" in name:
                continue
            if name.endswith(("norm1.weight", "norm2.weight")) or "norm" in name.split(".")[-2] and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))       # norm scales near 1
            elif p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:])) if p.ndim > 2 and "experts" not in name else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) * (scale * 2.0 / fan_in ** 0.5))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return model


def save_hf_model(config: ModelConfig, path, seed: int = 0):
    model = build_hf_model(config, seed)
    model.save_pretrained(str(path))
    return model


def multimodal_inputs(config: ModelConfig, spans: list, seed: int = 0, text_len: int = 3):
    """Processor-shaped inputs for one prompt. `spans` lists ("image", (t,h,w)) / ("video", (t,h,w)) items;
    text tokens surround each. Returns numpy arrays: input_ids [1,T], mm_token_type_ids [1,T],
    attention_mask [1,T], and pixel_values / image_grid_thw, pixel_values_videos / video_grid_thw."""
    rng = np.random.default_rng(seed)
    v = config.vision
    ids, types = [], []
    images, videos = [], []

    def text(n):
        ids.extend(rng.integers(2, 200, size=n).tolist())
        types.extend([0] * n)

    text(text_len)
    for kind, (t, h, w) in spans:
        per_frame = h * w // v.spatial_merge_size ** 2
        if kind == "image":
            images.append((t, h, w))
            ids.extend([config.image_start_token_id] + [config.image_token_id] * per_frame * t +
                       [config.image_end_token_id])
            types.extend([0] + [1] * per_frame * t + [0])
        else:
            videos.append((t, h, w))
            ids.append(config.video_start_token_id)
            types.append(0)
            for f in range(t):
                ids.extend([config.image_start_token_id] + [config.image_token_id] * per_frame +
                           [config.image_end_token_id, 10 + f])
                types.extend([0] + [2] * per_frame + [0, 0])
            ids.append(config.video_end_token_id)
            types.append(0)
        text(text_len)
    out = dict(input_ids=np.array([ids], np.int64), mm_token_type_ids=np.array([types], np.int64),
               attention_mask=np.ones((1, len(ids)), np.int64))
    if images:
        grid = np.array(images, np.int64)
        out.update(image_grid_thw=grid,
                   pixel_values=rng.standard_normal((int(grid.prod(-1).sum()), v.patch_dim)).astype(np.float32))
    if videos:
        grid = np.array(videos, np.int64)
        out.update(video_grid_thw=grid,
                   pixel_values_videos=rng.standard_normal((int(grid.prod(-1).sum()), v.patch_dim)).astype(np.float32))
    return out


def hf_logits(model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(np.asarray(x)) for k, x in inputs.items()})
    return out.logits.float().numpy()
