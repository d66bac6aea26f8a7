"""From an experiment config to the objects every stage needs: mesh, rules, model config, tokenizer,
processor, and the starting parameters (fresh, an HF checkpoint, or a previous stage's checkpoint).

    exp = setup(cfg, workdir)
    params = initial_params(exp, shardings)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import replace
from typing import Any

import jax
from jax.sharding import Mesh

from glmv_jax.config import RUNTIME_FIELDS, ModelConfig, get_preset
from glmv_jax.sharding import rules as rules_lib
from glmv_jax.sharding.mesh import mesh_from_config


@dataclasses.dataclass
class Experiment:
    cfg: Any                      # the ml_collections ConfigDict of this stage
    workdir: str
    mesh: Mesh
    rules: rules_lib.Rules
    model_config: ModelConfig
    tokenizer: Any
    processor: Any


def _tokenizer(cfg):
    from glmv_jax.data.tokenizer import load_tokenizer, suite_tokenizer
    if cfg.model.hf_checkpoint:
        return load_tokenizer(cfg.model.hf_checkpoint)
    return suite_tokenizer(cfg.data.get("vocab_size", 512))


def model_config_for(cfg, tokenizer) -> ModelConfig:
    """The preset (or the HF checkpoint's config) with the runtime knobs of `cfg.model`, its `vision` /
    `text` overrides, and, for a tokenizer of our own, the vocabulary and special ids of that tokenizer."""
    if cfg.model.hf_checkpoint:
        from glmv_jax.config import from_hf_config
        base = from_hf_config(cfg.model.hf_checkpoint)
    else:
        base = get_preset(cfg.model.preset)
    vision = replace(base.vision, **dict(cfg.model.get("vision", {}) or {}))
    text = replace(base.text, **dict(cfg.model.get("text", {}) or {}))
    config = replace(base, vision=vision, text=text, **{name: cfg.model[name] for name in RUNTIME_FIELDS})
    if not cfg.model.hf_checkpoint:
        ids = tokenizer.special_ids
        text = replace(config.text, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                       eos_token_id=tuple(tokenizer.stop_ids))
        config = replace(config, text=text, image_token_id=tokenizer.image_id, video_token_id=tokenizer.video_id,
                         image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
                         video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"])
    return config.validate()


def setup(cfg, workdir: str) -> Experiment:
    from glmv_jax.data.transforms import Processor
    mesh = mesh_from_config({"ici": dict(cfg.mesh.ici), "dcn": dict(cfg.mesh.dcn),
                             "devices": cfg.mesh.get("devices")})
    rules = rules_lib.get_rules(cfg.mesh.rules)
    tokenizer = _tokenizer(cfg)
    model_config = model_config_for(cfg, tokenizer)
    side = cfg.data.image_size
    budget = dict(min_pixels=2 * side * side, max_pixels=2 * side * side) if cfg.data.source == "synthetic" else {}
    processor = Processor.for_model(model_config, template=cfg.data.get("template", "glm41v"), **budget)
    os.makedirs(workdir, exist_ok=True)
    record_model(workdir, model_config, tokenizer)
    return Experiment(cfg, os.path.abspath(workdir), mesh, rules, model_config, tokenizer, processor)


def record_model(workdir: str, model_config: ModelConfig, tokenizer) -> None:
    """Writes what rebuilds this stage's model outside the run: model_config.json (HF config.json form plus
    the runtime knobs) and the tokenizer file (tokenizer.model for SentencePiece, tokenizer.json for HF)."""
    import json
    from glmv_jax.config import to_hf_config
    runtime = {k: getattr(model_config, k) for k in ("dtype", "param_dtype", "scan_layers", "remat", "attention")}
    with open(os.path.join(workdir, "model_config.json"), "w") as f:
        json.dump({**to_hf_config(model_config), "glmv_jax_runtime": runtime}, f, indent=1)
    if hasattr(tokenizer, "save"):
        tokenizer.save(os.path.join(workdir, "tokenizer.model"))
    elif getattr(tokenizer, "_tok", None) is not None and hasattr(tokenizer._tok, "save"):
        tokenizer._tok.save(os.path.join(workdir, "tokenizer.json"))


def param_shardings(exp: Experiment):
    from glmv_jax.models.glmv import init_params, logical_axes
    abstract = jax.eval_shape(lambda: init_params(exp.model_config, jax.random.key(0)))
    shardings = rules_lib.tree_shardings(logical_axes(exp.model_config), abstract, exp.mesh, exp.rules)
    if exp.mesh.size > 1:
        rules_lib.check_replication(shardings, abstract, exp.cfg.mesh.max_replicated_fraction)
    return abstract, shardings


def initial_params(exp: Experiment, abstract, shardings):
    """Params of a previous stage (`train.init_from`: its work directory), an HF checkpoint
    (`model.hf_checkpoint`), or None (the caller initializes fresh)."""
    if exp.cfg.train.init_from:
        from glmv_jax.train.checkpoint import Checkpointer
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        with Checkpointer(os.path.join(exp.cfg.train.init_from, "checkpoints"), save_every=1) as ckpt:
            return ckpt.restore_params(target)
    if exp.cfg.model.hf_checkpoint:
        from glmv_jax.convert.hf import load_pretrained
        _, params = load_pretrained(exp.cfg.model.hf_checkpoint, shardings=shardings)
        return params
    return None
