"""Each supervised stage (pretrain captions, long_context, sft) learns on the tiny model through the runner's
code path: the stage's config -> setup -> make_pipeline on the synthetic suite -> supervised.make_loss_fn ->
step.make_train_step, repeating one fixed batch. The pipeline config (pretrain -> long_context -> sft -> rl)
builds and validates for the real presets and for runlocal, variants reaching every stage.

The stages use one optimizer block and small batches; pretrain and sft have the same shapes and share one
compiled step, long_context packs the same number of tokens into rows twice as long (a second compile).
"""

import dataclasses

import jax
import numpy as np
import pytest

from experiments.configs import demo, long_context, pipeline, pretrain, sft
from experiments.configs.base import base_config
from experiments.configs.rl import CURRICULUM_SET_BY_RL, rl_block
from glmv_jax.config import RUNTIME_FIELDS, ModelConfig
from glmv_jax.config_schema import DATA_FILLED, MODEL_KEYS, ConfigError, validate
from glmv_jax.data.pipeline import DataConfig, data_config, make_pipeline
from glmv_jax.models.glmv import init_params
from glmv_jax.rl.curriculum import CurriculumConfig
from glmv_jax.rl.grpo import GRPOConfig
from glmv_jax.train.experiment import _tokenizer, model_config_for, setup
from glmv_jax.train.optimizer import DEFAULTS as OPTIMIZER_DEFAULTS
from glmv_jax.train.optimizer import build_optimizer
from glmv_jax.train.state import train_state_from_params
from glmv_jax.train.step import make_train_step
from glmv_jax.train.supervised import TRAIN_DEFAULTS, make_loss_fn

COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}    # same math, ~3x faster compile on this CPU
SHAPES = dict(seq_len=128, batch_size=2, patch_budget=256, image_size=32, num_records=6)
LONG_ROWS = dict(seq_len=256, batch_size=1)       # long_context: the same tokens in rows twice as long
OPTIMIZER = dict(lr=3e-3, warmup_steps=0, total_steps=100, final_lr_fraction=1.0, weight_decay=0.0)
STEPS = 6


def stage_config(module):
    cfg = module.get_config("model=tiny")
    cfg.data.update(SHAPES)
    if cfg.stage == "long_context":
        cfg.data.update(LONG_ROWS)
    cfg.optimizer.update(OPTIMIZER)
    cfg.mesh.ici, cfg.mesh.devices = {"data": 1}, 1
    return cfg


def random_init(rng):
    """Numpy init by leaf name: norm scales 1, biases 0, embeddings N(0, 1), kernels N(0, 1/fan_in)."""
    def init(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name or "bias" in name:
            return np.full(leaf.shape, float("scale" in name), np.float32)
        std = 1.0 if "embedding" in name or len(leaf.shape) < 2 else leaf.shape[-2] ** -0.5
        return (std * rng.standard_normal(leaf.shape)).astype(np.float32)
    return init


@pytest.fixture(scope="module")
def experiments(tmp_path_factory):
    modules = {"pretrain": pretrain, "long_context": long_context, "sft": sft}
    return {name: setup(stage_config(m), str(tmp_path_factory.mktemp(name))) for name, m in modules.items()}


@pytest.fixture(scope="module")
def shared_step(experiments):
    """One jitted step function for the three stages (their model configs and optimizer blocks are equal);
    it compiles once per batch shape."""
    exps = list(experiments.values())
    assert all(e.model_config == exps[0].model_config for e in exps)
    optimizer = build_optimizer(exps[0].cfg.optimizer)
    step = make_train_step(make_loss_fn(exps[0]), optimizer, compiler_options=COMPILER_OPTIONS)
    abstract = jax.eval_shape(lambda: init_params(exps[0].model_config, jax.random.key(0)))   # no init compile
    params = jax.tree_util.tree_map_with_path(random_init(np.random.default_rng(0)), abstract)
    return step, lambda: train_state_from_params(params, optimizer, jax.random.key(0))


def first_batch(exp):
    return next(make_pipeline(exp.cfg.data, exp.tokenizer, exp.processor, seed=exp.cfg.seed))


@pytest.mark.parametrize("name", ["pretrain", "long_context", "sft"])
def test_stage_learns_a_fixed_batch(name, experiments, shared_step):
    step, fresh_state = shared_step
    exp = experiments[name]
    assert exp.cfg.stage == name and exp.cfg.data.kind == ("sft" if name == "sft" else "caption")
    batch = first_batch(exp)
    real = batch["segment_ids"] > 0
    text = real & (batch["token_type"] == 0)
    if name == "sft":   # loss only on part of the text (assistant turns)
        assert 0 < batch["loss_mask"].sum() < text.sum() - 10
    else:               # captions: every text token that has a next text token in its segment
        assert batch["loss_mask"].sum() > 0.6 * text.sum()
    assert batch["segment_ids"].max() >= 2                         # packed: several samples in a row
    assert (batch["token_type"] == 1).sum() * 4 == (batch["patch_segment"] > 0).sum()

    state, losses = fresh_state(), []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        assert float(metrics["tokens"]) == batch["loss_mask"].sum()
        assert float(metrics["seq_tokens"]) == real.sum()
    assert np.isfinite(losses).all() and int(metrics["nonfinite_count"]) == 0
    assert all(b < a for a, b in zip(losses, losses[1:])), losses     # decreases at every step
    assert losses[-1] < losses[0] - 1.0, losses                        # by more than a nat


# ------------------------------------------------------------------------------ the pipeline config


def test_runlocal_pipeline_chains_four_stages_of_one_tiny_model():
    c = pipeline.get_config("runlocal")
    assert [s.stage for s in c.stages] == ["pretrain", "long_context", "sft", "rl"]
    assert [s.data.kind for s in c.stages] == ["caption", "caption", "sft", "rl"]
    assert list(c.eval_after) == ["sft", "rl"] and all("eval" in s for s in c.stages[2:])
    assert not any(s.train.init_from for s in c.stages)                   # run_pipeline chains them
    assert c.stages[1].data.seq_len > c.stages[0].data.seq_len            # long context is longer
    tokenizer = _tokenizer(c.stages[0])
    configs = [model_config_for(s, tokenizer) for s in c.stages]
    assert all(m == configs[0] for m in configs) and configs[0].text.hidden_size == 64   # the tiny preset
    for s in c.stages:
        assert s.model.dtype == "float32" and s.train.steps <= 100


@pytest.mark.parametrize("arg, preset, ici", [
    ("", "glm41v_9b", None),
    ("model=glm45v,mesh=fsdp2_ep4", "glm45v", {"fsdp": 2, "expert": 4}),
    ("model=glm46v,mesh=fsdp8,rules=default", "glm46v", {"fsdp": 8}),
])
def test_real_preset_pipeline_follows_the_paper_and_the_variants(arg, preset, ici):
    c = pipeline.get_config(arg)
    pre, lc, ft, r = c.stages
    assert all(s.model.preset == preset for s in c.stages)
    assert (pre.data.seq_len, lc.data.seq_len) == (8192, 32768)             # 8K pretraining, 32K long context
    assert pre.train.steps == 120_000 and lc.train.steps == 10_000
    assert ft.data.kind == "sft" and r.rl.sampler == "rlcs"
    assert all(s.model.dtype == "bfloat16" for s in c.stages)
    if ici is None:
        assert dict(lc.mesh.ici) == {"fsdp": -1, "sequence": 4}              # the stage's own default
    else:
        assert all(dict(s.mesh.ici) == ici for s in c.stages)               # an explicit mesh wins everywhere
    pipeline.validate_pipeline(c)


def test_pipeline_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown config variants"):
        pipeline.get_config("runlocal,modle=tiny")
    with pytest.raises(ValueError, match="unknown mesh variant"):
        pipeline.get_config("runlocal,mesh=nope")
    with pytest.raises(ValueError, match="model.preset = .glm99. is not one of"):
        pipeline.get_config("model=glm99")
    c = pipeline.get_config("runlocal")
    c.stages[2].model.preset = "tiny_moe"
    with pytest.raises(ValueError, match="share one model"):
        pipeline.validate_pipeline(c)
    c = pipeline.get_config("runlocal")
    c.stages[1].train.init_from = "/somewhere"
    with pytest.raises(ValueError, match="previous stage's checkpoint"):
        pipeline.validate_pipeline(c)
    c = pipeline.get_config("runlocal")
    c.eval_after = ["sft", "pretrain", "eval"]
    with pytest.raises(ValueError, match=r"not stages of this pipeline"):
        pipeline.validate_pipeline(c)
    c = pipeline.get_config("runlocal")
    c.stages[0].optimizer.lr = -1.0
    with pytest.raises(ValueError, match="lr must be > 0"):
        pipeline.validate_pipeline(c)


@pytest.mark.parametrize("block, key, hint", [
    ("rl.grpo", "eps_hihg", "eps_high"), ("rl.curriculum", "fill_qouta", "fill_quota"),
    ("model.text", "hidden_szie", "hidden_size"), ("model.vision", "dept", "depth"),
    ("model", "remmat", "remat"), ("data", "seq_lenn", "seq_len"), ("train", "log_evry", "log_every"),
    ("optimizer", "warmup_step", "warmup_steps"), ("mesh", "icl", "ici")])
def test_a_key_typo_in_a_dataclass_block_names_the_key_and_the_right_one(block, key, hint):
    cfg = demo.get_config().stages[2]
    target = cfg
    for part in block.split("."):
        target = target[part]
    target[key] = 1
    with pytest.raises(ConfigError, match=rf"unknown key {block}.{key} \(did you mean '{hint}'\?\)"):
        validate(cfg)


@pytest.mark.parametrize("key, value", [("model.dtype", "float8"), ("model.remat", "ful"),
                                        ("model.attention", "flash"), ("rl.sampler", "ppo")])
def test_a_bad_choice_names_its_key(key, value):
    cfg = demo.get_config().stages[2]
    block, name = key.split(".")
    cfg[block][name] = value
    with pytest.raises(ConfigError, match=rf"{key} = '{value}' is not one of"):
        validate(cfg)


def test_derived_defaults_agree_with_the_dataclasses():
    """The rl block's grpo and curriculum values construct the dataclasses; every default the configs do
    not override is the dataclass's own."""
    rl = demo.get_config().stages[2].rl
    grpo = GRPOConfig(**rl.grpo)
    for f in dataclasses.fields(GRPOConfig):
        if f.name not in rl.grpo:
            assert getattr(grpo, f.name) == f.default


def test_model_data_optimizer_train_blocks_are_their_sources_defaults():
    """base_config's blocks hold exactly the keys of the code that reads them, with its defaults except
    the overrides base.py names."""
    c = base_config("", stage="sft")
    assert set(c.model) == set(MODEL_KEYS) - {"text", "vision"}
    assert all(c.model[name] == getattr(ModelConfig, name) for name in RUNTIME_FIELDS)
    data_fields = [f for f in dataclasses.fields(DataConfig) if f.name not in DATA_FILLED]
    assert set(c.data) == {f.name for f in data_fields}
    for f in data_fields:
        expected = "caption" if f.name == "kind" else f.default
        value = c.data[f.name]
        assert (tuple(value) if isinstance(value, list) else value) == expected, f.name
    assert set(c.optimizer) == set(OPTIMIZER_DEFAULTS) and dict(c.train) == TRAIN_DEFAULTS
    c.data.frames = 4                                   # a typed placeholder: settable from the command line
    assert data_config(c.data).frames == 4


def test_a_stage_filled_data_key_is_refused():
    cfg = demo.get_config().stages[0]
    cfg.data.seed = 3                                   # the stage's own seed would silently win
    with pytest.raises(ConfigError, match="unknown key data.seed"):
        validate(cfg)


def test_rl_block_is_the_dataclasses_defaults_plus_named_overrides():
    block = rl_block()
    overrides = {"grpo": {"num_minibatches": 4, "signal_rows_only": True},
                 "curriculum": {"ema_decay": 0.5, "fill_quota": True, "pool_tiers": True}}
    for name, cls in (("grpo", GRPOConfig), ("curriculum", CurriculumConfig)):
        fields = [f for f in dataclasses.fields(cls) if f.name not in CURRICULUM_SET_BY_RL]
        assert set(block[name]) == {f.name for f in fields}
        for f in fields:
            assert block[name][f.name] == overrides[name].get(f.name, f.default), (name, f.name)
