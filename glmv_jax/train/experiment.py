"""From an experiment config to the objects every stage needs: mesh, rules, model config, tokenizer,
processor, and the starting parameters (fresh, an HF checkpoint, or a previous stage's checkpoint).

    exp = setup(cfg, workdir)          # preflight(cfg) first: config errors that need devices or files
    params = initial_params(exp, shardings)

A stage directory describes itself: setup writes config.json (the stage config; `read_stage_config`
restores it with the dataclass blocks' tuples), model_config.json and the tokenizer file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from glmv_jax.config import (RUNTIME_FIELDS, ConfigError, ModelConfig, TextConfig, VisionConfig, from_hf_config,
                             get_preset, restore_tuples, to_hf_config)
from glmv_jax.data.pipeline import DataConfig, check_patch_budget, data_config
from glmv_jax.data.transforms import Processor
from glmv_jax.sharding import rules as rules_lib
from glmv_jax.sharding.mesh import mesh_from_config

SUPERVISED_STAGES = ("pretrain", "long_context", "sft")
CONFIG_FILE = "config.json"
TYPED_BLOCKS = ((("model", "text"), TextConfig), (("model", "vision"), VisionConfig), (("data",), DataConfig))


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


def base_model_config(cfg) -> ModelConfig:
    """The preset (or the HF checkpoint's config) with the runtime knobs of `cfg.model` and its `vision` /
    `text` overrides (no tokenizer: its vocabulary and special ids are model_config_for's)."""
    if cfg.model.hf_checkpoint:
        base = from_hf_config(cfg.model.hf_checkpoint)
    else:
        base = get_preset(cfg.model.preset)
    vision = replace(base.vision, **restore_tuples(VisionConfig, cfg.model.get("vision", {}) or {}))
    text = replace(base.text, **restore_tuples(TextConfig, cfg.model.get("text", {}) or {}))
    return replace(base, vision=vision, text=text, **{name: cfg.model[name] for name in RUNTIME_FIELDS})


def model_config_for(cfg, tokenizer) -> ModelConfig:
    """base_model_config with, for a tokenizer of our own, the vocabulary and special ids of that tokenizer."""
    config = base_model_config(cfg)
    if not cfg.model.hf_checkpoint:
        ids = tokenizer.special_ids
        text = replace(config.text, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                       eos_token_id=tuple(tokenizer.stop_ids))
        config = replace(config, text=text, image_token_id=tokenizer.image_id, video_token_id=tokenizer.video_id,
                         image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
                         video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"])
    return config.validate()


def data_processor(data, model_config: ModelConfig, template: str | None = None) -> Processor:
    """The processor of a `data` block: synthetic images at a fixed 2 * image_size^2 pixel budget, else HF's
    defaults."""
    side = data.image_size
    budget = dict(min_pixels=2 * side * side, max_pixels=2 * side * side) if data.source == "synthetic" else {}
    return Processor.for_model(model_config, template=template or data.get("template", "glm41v"), **budget)


def check_directories(cfg) -> None:
    """model.hf_checkpoint must be a directory, train.init_from a stage directory with a committed checkpoint."""
    if cfg.model.hf_checkpoint and not os.path.isdir(cfg.model.hf_checkpoint):
        raise ConfigError(f"model.hf_checkpoint: no such directory: {cfg.model.hf_checkpoint}")
    init_from = cfg.train.init_from
    if init_from:
        folder = os.path.join(init_from, "checkpoints")
        missing = next((path for path in (init_from, folder) if not os.path.isdir(path)), None)
        if missing:
            raise ConfigError(f"train.init_from: no such directory: {missing}")
        if not has_checkpoint(init_from):
            raise ConfigError(f"train.init_from: no committed checkpoint in {folder}")


def check_batch_mesh(cfg, mesh: Mesh, rules: rules_lib.Rules) -> None:
    """A supervised stage's micro-batch rows must split evenly over the mesh axes its rules shard the batch
    over (else those axes would be dropped and every device would compute the whole batch)."""
    if cfg.stage not in SUPERVISED_STAGES:
        return
    spec = rules_lib.logical_to_spec(("act_batch",), None, mesh, rules)[0]
    axes = {axis: mesh.shape[axis] for axis in ((spec,) if isinstance(spec, str) else spec or ())}
    rows = cfg.data.batch_size // cfg.train.grad_accum_steps
    if rows % math.prod(axes.values()):
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} ({rows} rows per micro-batch) is not divisible by "
                          f"the data-parallel mesh axes {axes} (mesh.ici, mesh.rules={cfg.mesh.rules!r})")


def stage_mesh(cfg) -> tuple[Mesh, rules_lib.Rules]:
    mesh = mesh_from_config({"ici": dict(cfg.mesh.ici), "dcn": dict(cfg.mesh.dcn), "devices": cfg.mesh.get("devices")})
    return mesh, rules_lib.get_rules(cfg.mesh.rules)


def preflight(cfg) -> tuple[Mesh, rules_lib.Rules, Processor]:
    """The config errors that need the devices, the file system or the model's vision config, each naming its
    key, before anything is compiled: (mesh, rules, processor) of the stage."""
    check_directories(cfg)
    mesh, rules = stage_mesh(cfg)
    check_batch_mesh(cfg, mesh, rules)
    processor = data_processor(cfg.data, base_model_config(cfg))
    check_patch_budget(data_config(cfg.data, micro_batches=cfg.train.grad_accum_steps), processor)
    return mesh, rules, processor


def setup(cfg, workdir: str) -> Experiment:
    mesh, rules, processor = preflight(cfg)
    tokenizer = _tokenizer(cfg)
    model_config = model_config_for(cfg, tokenizer)
    os.makedirs(workdir, exist_ok=True)
    write_stage_config(cfg, workdir)
    record_model(workdir, model_config, tokenizer)
    return Experiment(cfg, os.path.abspath(workdir), mesh, rules, model_config, tokenizer, processor)


def write_stage_config(cfg, stage_dir: str | os.PathLike) -> None:
    with open(os.path.join(stage_dir, CONFIG_FILE), "w") as f:
        f.write(cfg.to_json_best_effort(indent=1))


def read_stage_config(stage_dir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The stage config experiments.run saved for `stage_dir`: its config.json, else (runs from before stage
    directories had one) its entry in the pipeline's config.json one level up; the lists of the dataclass
    blocks' tuple fields (model.text, model.vision, data) turned back into tuples."""
    stage_dir = Path(stage_dir)
    for path in (stage_dir / CONFIG_FILE, stage_dir.parent / CONFIG_FILE):
        if path.is_file():
            values = json.loads(path.read_text())
            if "stages" in values:
                index = stage_dir.name.split("_")[0]
                if not index.isdigit() or int(index) >= len(values["stages"]):
                    raise FileNotFoundError(f"{path} is a pipeline config; {stage_dir} is not one of its "
                                            f"<i>_<stage> directories")
                values = values["stages"][int(index)]
            return ml_collections.ConfigDict(restore_types(values))
    raise FileNotFoundError(f"no {CONFIG_FILE} (written by experiments.run) in {stage_dir} or its parent")


def restore_types(values: dict) -> dict:
    """A stage config's JSON values with the tuples of its dataclass blocks (TYPED_BLOCKS) restored."""
    out = copy.deepcopy(values)
    for (*parents, name), cls in TYPED_BLOCKS:
        block = out
        for key in parents:
            block = block.get(key) or {}
        if isinstance(block.get(name), dict):
            block[name] = restore_tuples(cls, block[name])
    return out


def has_checkpoint(stage_dir: str | os.PathLike) -> bool:
    """Whether `stage_dir/checkpoints` holds a committed step (a directory named by its step number)."""
    folder = os.path.join(stage_dir, "checkpoints")
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def record_model(workdir: str, model_config: ModelConfig, tokenizer) -> None:
    """Writes what rebuilds this stage's model outside the run: model_config.json (HF config.json form plus
    the runtime knobs) and the tokenizer file (tokenizer.model for SentencePiece, tokenizer.json for HF)."""
    runtime = {k: getattr(model_config, k) for k in ("dtype", "param_dtype", "scan_layers", "remat", "attention")}
    with open(os.path.join(workdir, "model_config.json"), "w") as f:
        json.dump({**to_hf_config(model_config), "glmv_jax_runtime": runtime}, f, indent=1)
    if hasattr(tokenizer, "file_name"):
        tokenizer.save(os.path.join(workdir, tokenizer.file_name))


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
