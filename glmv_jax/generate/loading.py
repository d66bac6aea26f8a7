"""Loading a model for inference and text generation from records (prompts: generate/prompts.py).

    bundle = load_model("dir")              # HF checkpoint dir, or a work directory of experiments.run
    generate_fn = make_generate_fn("ckpt_dir", max_new_tokens=256, temperature=1.0, top_p=1.0, seed=0, style="glm41v")
    texts = generate_fn(records, n)         # [[str] * n] per record (rl/difficulty.py)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jax

from glmv_jax.config import ModelConfig
from glmv_jax.convert.hf import load_pretrained
from glmv_jax.data.tokenizer import load_tokenizer, tokenizer_file
from glmv_jax.data.transforms import TEMPLATE_OF_MODEL, Processor
from glmv_jax.generate.prompts import prompt_dicts
from glmv_jax.generate.sampler import answer_ids, check_sampling, generate, response_text
from glmv_jax.models.glmv import init_params
from glmv_jax.train.checkpoint import Checkpointer
from glmv_jax.train.experiment import _tokenizer, data_processor, model_config_for, read_stage_config


@dataclass
class ModelBundle:
    config: ModelConfig
    params: Any
    tokenizer: Any
    processor: Any


def _is_hf_dir(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


def _run_stage(path: Path):
    """(stage ConfigDict, stage directory) of an experiments.run work directory: a stage dir (holding
    checkpoints/) or a pipeline dir (its last stage that has checkpoints)."""
    stage_dir = path
    if not (path / "checkpoints").is_dir():
        stages = [d for d in path.iterdir() if re.fullmatch(r"\d+_\w+", d.name) and (d / "checkpoints").is_dir()]
        if not stages:
            raise FileNotFoundError(f"{path} is neither an HF checkpoint (model.safetensors) nor a run work "
                                    f"directory (checkpoints/ or <i>_<stage>/checkpoints/)")
        stage_dir = max(stages, key=lambda d: int(d.name.split("_")[0]))
    return read_stage_config(stage_dir), stage_dir


def _run_tokenizer(cfg, stage_dir: Path):
    """The run's tokenizer file when it saved one (tokenizer.model / tokenizer.json in the stage or work
    directory), else rebuilt from the config as experiment.setup does (the suite tokenizer is retrained
    from the current task-suite code, so a changed suite gives a different tokenizer)."""
    for folder in (stage_dir, stage_dir.parent):
        if tokenizer_file(folder) is not None:
            return load_tokenizer(folder)
    return _tokenizer(cfg)


def load_model(path: str | Path, template: str | None = None) -> ModelBundle:
    """An HF checkpoint directory (config.json + safetensors + tokenizer.json or tokenizer.model) or an
    experiments.run work directory (config.json + orbax checkpoints/; tokenizer and model config rebuilt from
    the run's config)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if _is_hf_dir(path):
        config, params = load_pretrained(path)
        tokenizer = load_tokenizer(path)
        processor = Processor.for_model(config, template=template or TEMPLATE_OF_MODEL.get(config.model_type, "glm41v"))
    else:
        cfg, stage_dir = _run_stage(path)
        tokenizer = _run_tokenizer(cfg, stage_dir)
        config = model_config_for(cfg, tokenizer)
        processor = data_processor(cfg.data, config, template)
        abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
        with Checkpointer(stage_dir / "checkpoints", save_every=1) as ckpt:
            params = ckpt.restore_params(abstract)
    check_tokenizer_matches(config, tokenizer)
    return ModelBundle(config, params, tokenizer, processor)


def check_tokenizer_matches(config: ModelConfig, tokenizer) -> None:
    """The tokenizer's special ids must be the model's (a 4.1V tokenizer with a 4.5V model is an error)."""
    ids = tokenizer.special_ids
    pairs = {"<|image|>": config.image_token_id, "<|video|>": config.video_token_id,
             "<|begin_of_image|>": config.image_start_token_id, "<|end_of_image|>": config.image_end_token_id,
             "<|begin_of_video|>": config.video_start_token_id, "<|end_of_video|>": config.video_end_token_id}
    wrong = {t: (ids.get(t), want) for t, want in pairs.items() if ids.get(t) != want}
    if wrong:
        raise ValueError(f"tokenizer and model config disagree on special ids (tokenizer, model): {wrong}")
    if tokenizer.vocab_size > config.text.vocab_size:
        raise ValueError(f"tokenizer vocabulary {tokenizer.vocab_size} exceeds the model's {config.text.vocab_size}")


def make_generate_fn(checkpoint_or_params: Any, config: ModelConfig | None = None, tokenizer: Any = None,
                     processor: Any = None, *, max_new_tokens: int = 1024, temperature: float = 1.0,
                     top_p: float = 1.0, top_k: int = 0, seed: int = 0, style: str = "glm41v",
                     thinking_budget: int | None = None, max_rows: int = 64):
    """generate_fn(records, n) -> [[response text] * n] per record. checkpoint_or_params: a directory
    (load_model) or a params tree (then config and tokenizer are required). Each call draws fresh samples
    (key fold_in(seed, call number)); rows are generated max_rows at a time."""
    template = {"glm41v": "glm41v", "glm45v": "glm45v", "glm46v": "glm46v"}.get(style)
    if template is None:
        raise ValueError(f"unknown style {style!r}; expected glm41v, glm45v or glm46v")
    if isinstance(checkpoint_or_params, (str, Path)):
        bundle = load_model(checkpoint_or_params, template)
        config, tokenizer = config or bundle.config, tokenizer or bundle.tokenizer
        processor, params = processor or bundle.processor, bundle.params
    else:
        if config is None or tokenizer is None:
            raise ValueError("make_generate_fn with a params tree needs config and tokenizer")
        params = checkpoint_or_params
        processor = processor or Processor.for_model(config, template=template)
    force_ids, extra_stops = answer_ids(tokenizer, style)
    stop_ids = tuple(tokenizer.stop_ids) + extra_stops
    check_sampling(max_new_tokens, temperature, top_p, top_k, thinking_budget, force_ids)
    calls = [0]

    def generate_fn(records: Sequence[dict], n: int) -> list[list[str]]:
        prompts = prompt_dicts(records, tokenizer, processor)
        key = jax.random.fold_in(jax.random.key(seed), calls[0])
        calls[0] += 1
        per_chunk = max(1, max_rows // n)
        texts: list[str] = []
        for c, start in enumerate(range(0, len(prompts), per_chunk)):
            out = generate(config, params, prompts[start:start + per_chunk], num_samples=n,
                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                           stop_ids=stop_ids, rng=jax.random.fold_in(key, c), thinking_budget=thinking_budget,
                           force_answer_ids=force_ids if thinking_budget is not None else None,
                           pad_id=tokenizer.pad_id)
            texts += [response_text(tokenizer, out["tokens"][r], out["lengths"][r]) for r in range(len(out["lengths"]))]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

    return generate_fn
