"""Shared experiment config: the blocks every stage has, the variant parser, and validation.

A stage config file is `get_config(arg)` returning `base_config(arg, stage=...)` with its own values.
`arg` is the text after the colon in `--config=experiments/configs/sft.py:model=glm41v_9b,mesh=fsdp8`:
comma-separated `key=value` variants, plus bare flags (`runlocal`: tiny sizes for a laptop).

The blocks are derived from the code that reads them, so defaults live in one place: `model` from
ModelConfig's runtime fields, `data` from DataConfig, `optimizer` from train/optimizer.DEFAULTS, `train`
from train/supervised.TRAIN_DEFAULTS (and rl.py's `rl.grpo` / `rl.curriculum` from their dataclasses);
glmv_jax/config_schema.py checks every key against the same sources.
"""

from __future__ import annotations

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from glmv_jax import config_schema
from glmv_jax.config import RUNTIME_FIELDS, ModelConfig
from glmv_jax.data.pipeline import DataConfig
from glmv_jax.train.optimizer import DEFAULTS as OPTIMIZER_DEFAULTS
from glmv_jax.train.supervised import TRAIN_DEFAULTS

MESHES = {  # name -> ICI axis sizes (-1: all remaining devices)
    "auto": {"fsdp": -1},
    "single": {"data": 1},
    "fsdp8": {"fsdp": 8},
    "dp2_fsdp4": {"data": 2, "fsdp": 4},
    "dp2_fsdp2_tp2": {"data": 2, "fsdp": 2, "tensor": 2},
    "fsdp2_ep4": {"fsdp": 2, "expert": 4},
    "fsdp_tp": {"fsdp": -1, "tensor": 4},
}
STAGES = config_schema.STAGES


def parse_variants(arg: str | None) -> dict[str, str]:
    """"model=tiny,mesh=fsdp8,runlocal" -> {"model": "tiny", "mesh": "fsdp8", "runlocal": "1"}."""
    out = {}
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip() if _ else "1"
    return out


def dataclass_defaults(cls, skip=(), **overrides) -> dict:
    """A config block from a dataclass: every field's default (the one source of truth), then `overrides`.
    Tuples become lists, except in a `tuple | str` field, which takes a list in a config file and any string
    on the command line (`--config.data.manifests=a.jsonl,b.jsonl`; its reader splits the commas); a None
    default of an `int | None` field becomes a typed placeholder, so that `--config.data.frames=4` parses
    as an int."""
    hints = typing.get_type_hints(cls)
    block = {f.name: _block_value(f.default, hints.get(f.name)) for f in dataclasses.fields(cls)
             if f.name not in skip and f.default is not dataclasses.MISSING}
    unknown = set(overrides) - set(block)
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
    return {**block, **overrides}


def _block_value(value, hint):
    if isinstance(value, tuple):
        if str in typing.get_args(hint):      # untyped: ml_collections parses neither lists nor "/a,/b" tuples
            return config_dict.FieldReference(value, field_type=object)
        return list(value)
    if value is None:
        types = [t for t in typing.get_args(hint) if t is not type(None)]
        if len(types) == 1 and types[0] in (int, float, str, bool):
            return config_dict.placeholder(types[0])
    return value


def defaults_with(defaults: dict, **overrides) -> dict:
    """`defaults` (a module's table of keys and defaults) with `overrides`, which must be among its keys."""
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ValueError(f"no keys {sorted(unknown)} in {sorted(defaults)}")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in {**defaults, **overrides}.items()}


def base_config(arg: str | None, stage: str) -> ml_collections.ConfigDict:
    variants = parse_variants(arg)
    known = {"model", "mesh", "rules", "runlocal"}
    unknown = set(variants) - known
    if unknown:
        raise ValueError(f"unknown config variants {sorted(unknown)}; expected some of {sorted(known)}")
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0
    c.runlocal = "runlocal" in variants

    model = {name: getattr(ModelConfig, name) for name in RUNTIME_FIELDS}   # dtype "bfloat16" on accelerators
    c.model = ml_collections.ConfigDict(dict(
        preset=variants.get("model", "tiny"),
        hf_checkpoint="",         # a local HF directory to start from (load_pretrained)
        **model,
    ))
    c.mesh = ml_collections.ConfigDict(dict(
        ici=MESHES.get(variants.get("mesh", "auto"), None) or _bad("mesh", variants.get("mesh"), MESHES),
        dcn={},
        devices=0,                # 0: all devices; n: only the first n
        rules=variants.get("rules", "default"),
        max_replicated_fraction=0.05,
    ))
    # seed and micro_batches come from the stage (its seed, train.grad_accum_steps): not data keys
    c.data = ml_collections.ConfigDict(dataclass_defaults(DataConfig, skip=config_schema.DATA_FILLED,
                                                          kind="caption"))
    c.optimizer = ml_collections.ConfigDict(defaults_with(
        OPTIMIZER_DEFAULTS, lr=1e-3, warmup_steps=10, total_steps=100, b2=0.98, weight_decay=0.01))
    c.train = ml_collections.ConfigDict(dict(TRAIN_DEFAULTS))
    return c


def _bad(what, value, table):
    raise ValueError(f"unknown {what} variant {value!r}; expected one of {sorted(table)}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Config errors reported before anything is compiled (glmv_jax/config_schema.py)."""
    config_schema.validate(c)
