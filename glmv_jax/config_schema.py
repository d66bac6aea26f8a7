"""Start-up validation (experiments/run.py, before the first stage compiles) of an experiment config (ml-collections): every error names its key, before
anything is compiled.

Every block's keys are checked against the code that reads them (a typo gets the valid names and the
closest match); blocks that a dataclass implements are then constructed, so its own checks run too:

    model        -> config.RUNTIME_FIELDS + preset, hf_checkpoint, text, vision
    model.text   -> config.TextConfig          data          -> data.pipeline.DataConfig (less DATA_FILLED)
    model.vision -> config.VisionConfig        optimizer     -> train.optimizer.DEFAULTS
    rl.grpo      -> rl.grpo.GRPOConfig         train         -> train.supervised.TRAIN_DEFAULTS
    rl.curriculum -> rl.curriculum.CurriculumConfig          mesh -> MESH_KEYS

Names owned by an implementation are read from it: presets (config.PRESETS), attention implementations
(models.attention.ACCEPTED), remat policies (models.layers.REMAT_POLICIES), samplers (rl.stage.SAMPLERS).

`check_rerun` compares a stage config with the one saved in a stage directory that holds checkpoints:
keys under RERUN_GUARDED (shapes, the data stream, prompt pools, sampler state) must not change; the
others (steps, logging, checkpoint cadence, mesh, eval, ...) may.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from typing import Iterable, Mapping

from glmv_jax.config import PRESETS, RUNTIME_FIELDS, ConfigError, TextConfig, VisionConfig
from glmv_jax.data.pipeline import DataConfig, data_config
from glmv_jax.models.attention import ACCEPTED as ATTENTION_IMPLEMENTATIONS
from glmv_jax.models.layers import REMAT_POLICIES
from glmv_jax.rl.curriculum import CurriculumConfig
from glmv_jax.rl.grpo import GRPOConfig
from glmv_jax.rl.health import HealthConfig
from glmv_jax.rl.stage import SAMPLERS
from glmv_jax.train.optimizer import DEFAULTS as OPTIMIZER_DEFAULTS
from glmv_jax.train.optimizer import build_optimizer
from glmv_jax.train.supervised import TRAIN_DEFAULTS

STAGES = ("pretrain", "long_context", "sft", "rl", "eval")
DTYPES = ("float32", "bfloat16", "float16")
CURRICULUM_FROM_RL = ("batch_size", "group_size", "seed")    # CurriculumConfig fields the rl block sets
DATA_FILLED = ("seed", "micro_batches")     # DataConfig fields the stage fills (its seed, train.grad_accum_steps)
MODEL_KEYS = ("preset", "hf_checkpoint", "text", "vision") + RUNTIME_FIELDS
MESH_KEYS = ("ici", "dcn", "devices", "rules", "max_replicated_fraction")   # train/experiment.py, train/aot.py
# A rerun on a stage directory with checkpoints must keep these (a key, or a block: all of its keys) ...
RERUN_GUARDED = ("stage", "seed", "model", "data", "train.grad_accum_steps", "optimizer.freeze", "rl.sampler",
                 "rl.batch_size", "rl.group_size", "rl.prompts_per_domain", "rl.prompt_tiers", "rl.prompt_split",
                 "rl.curriculum", "rl.offline_difficulty", "rl.offline_samples", "rl.offline_prompts", "rl.pilot",
                 "rl.pilot_min_informative", "rl.pilot_min_lead_se", "rl.pilot_blind_weight", "rl.domains",
                 "rl.health.probe_per_domain")
# ... except these, which change neither shapes nor what the data stream yields
RERUN_FREE = ("model.remat", "model.attention", "data.on_bad_record", "data.max_consecutive_bad", "data.num_workers",
              "data.read_threads", "data.prefetch", "data.check")
RERUN_BLOCKS = ("model", "mesh", "data", "optimizer", "train", "rl", "rl.grpo", "rl.curriculum", "rl.health",
                "eval")  # compared key by key


def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def check_keys(block: Mapping, valid: Iterable[str], where: str) -> None:
    """Raise for the first key of `block` not among `valid`, with the closest valid name."""
    valid = sorted(valid)
    for key in block:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {where}.{key}{hint}; valid keys: {', '.join(valid)}")


def check_choice(value, choices: Iterable, key: str) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key} = {value!r} is not one of {', '.join(map(repr, choices))}")


def _construct(cls, values: Mapping, where: str, **fixed):
    try:
        return cls(**fixed, **dict(values))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def validate_model(model) -> None:
    check_keys(model, MODEL_KEYS, "model")
    check_choice(model.preset, sorted(PRESETS), "model.preset")
    check_choice(model.dtype, DTYPES, "model.dtype")
    check_choice(model.param_dtype, DTYPES, "model.param_dtype")
    check_choice(model.remat, ("none",) + tuple(REMAT_POLICIES), "model.remat")
    check_choice(model.attention, ATTENTION_IMPLEMENTATIONS, "model.attention")
    for name, cls in (("text", TextConfig), ("vision", VisionConfig)):
        overrides = dict(model.get(name, {}) or {})
        check_keys(overrides, field_names(cls), f"model.{name}")


def validate_rl(rl) -> None:
    check_choice(rl.sampler, SAMPLERS, "rl.sampler")
    grpo = dict(rl.get("grpo", {}) or {})
    check_keys(grpo, field_names(GRPOConfig), "rl.grpo")
    _construct(GRPOConfig, grpo, "rl.grpo")
    curriculum = dict(rl.get("curriculum", {}) or {})
    check_keys(curriculum, set(field_names(CurriculumConfig)) - set(CURRICULUM_FROM_RL), "rl.curriculum")
    _construct(CurriculumConfig, curriculum, "rl.curriculum", batch_size=rl.batch_size, group_size=rl.group_size)
    check_choice(rl.get("offline_difficulty", "labels"), ("labels", "measure"), "rl.offline_difficulty")
    health = dict(rl.get("health", {}) or {})
    check_keys(health, field_names(HealthConfig), "rl.health")
    _construct(HealthConfig, health, "rl.health")


def validate(c) -> None:
    """Config errors reported before anything is compiled (ConfigError, a ValueError, naming the key)."""
    check_choice(c.stage, STAGES, "stage")
    validate_model(c.model)
    check_keys(c.mesh, MESH_KEYS, "mesh")
    check_keys(c.train, TRAIN_DEFAULTS, "train")
    check_keys(c.data, set(field_names(DataConfig)) - set(DATA_FILLED), "data")
    try:
        data = data_config(c.data)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data: {e}") from None
    validate_data_source(data)
    if c.train.steps < 0 or c.train.grad_accum_steps < 1:
        raise ConfigError("train.steps must be >= 0 and train.grad_accum_steps >= 1")
    if c.data.batch_size % c.train.grad_accum_steps:
        raise ConfigError(f"data.batch_size {c.data.batch_size} not divisible by train.grad_accum_steps "
                          f"{c.train.grad_accum_steps}")
    check_choice(c.data.on_bad_record, ("skip", "raise"), "data.on_bad_record")
    check_choice(c.train.nonfinite, ("skip", "raise"), "train.nonfinite")
    if c.stage == "rl" and "rl" not in c:
        raise ConfigError("an rl stage needs an `rl` config block (experiments/configs/rl.py: rl_block())")
    if "rl" in c:
        validate_rl(c.rl)
    check_keys(c.optimizer, OPTIMIZER_DEFAULTS, "optimizer")
    build_optimizer(c.optimizer)          # raises on a bad value


def _flat(values, prefix: str = "") -> dict:
    """{"data.seq_len": value} over the config blocks (RERUN_BLOCKS); other values (model.text overrides,
    data.tiers, mesh.ici, ...) are compared whole. Values JSON-normalized (tuples as lists)."""
    values = values.to_dict() if hasattr(values, "to_dict") else values
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if name in RERUN_BLOCKS and isinstance(value, Mapping):
            out.update(_flat(value, name + "."))
        else:
            out[name] = json.loads(json.dumps(value, default=str))
    return out


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def rerun_conflicts(saved: Mapping, new: Mapping) -> list[str]:
    """The RERUN_GUARDED keys (less RERUN_FREE) on which two stage configs differ, among the keys both have
    (a key the code added since the saved run takes its default)."""
    old, now = _flat(saved), _flat(new)
    return sorted(k for k in old.keys() & now.keys()
                  if old[k] != now[k] and _under(k, RERUN_GUARDED) and not _under(k, RERUN_FREE))


def check_rerun(saved: Mapping, new: Mapping, stage_dir: str) -> None:
    """ConfigError naming the keys where `new` differs from the config saved with stage_dir's checkpoints."""
    keys = rerun_conflicts(saved, new)
    if keys:
        old, now = _flat(saved), _flat(new)
        diffs = "; ".join(f"{k}: saved {old[k]!r}, now {now[k]!r}" for k in keys)
        raise ConfigError(f"{stage_dir} holds checkpoints of a different config ({diffs}): resuming would not fit "
                          f"them; use another --workdir or the saved values")


def validate_data_source(data: DataConfig) -> None:
    """Manifests (already split by data_config: "a.jsonl,b.jsonl" -> two) given exactly when they are read."""
    if data.source in ("jsonl", "array_record") and not data.manifests:
        raise ConfigError(f"data.source={data.source!r} needs data.manifests "
                          f"(e.g. --config.data.manifests=a.jsonl,b.jsonl)")
    if data.source == "synthetic" and data.manifests:
        raise ConfigError(f"data.manifests={list(data.manifests)} is set but data.source='synthetic' ignores it: "
                          f"set --config.data.source=jsonl (or array_record)")
