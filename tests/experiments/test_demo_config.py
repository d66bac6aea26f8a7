"""The demo config's variants and the settings issue 11's measurements rest on; every config file refuses an
unknown variant; a saved pipeline config restores a stage's config with its tuples."""
import importlib
from pathlib import Path

import pytest

from experiments.configs import demo
from experiments.run import default_workdir
from glmv_jax.train.experiment import read_stage_config

CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "experiments" / "configs").glob("*.py")
                 if p.stem not in ("__init__", "base"))


def test_seed_variant_reaches_every_stage_and_typos_are_refused():
    cfg = demo.get_config("seed=2")
    assert [s.seed for s in cfg.stages] == [2, 2, 2]
    assert all(s.eval.seed == 0 for s in cfg.stages)          # the same held-out prompts whatever the seed
    with pytest.raises(ValueError, match="unknown demo.py variants"):
        demo.get_config("smokee")


def test_rl_stage_runs_rlcs_as_measured():
    rl = demo.get_config().stages[2].rl
    assert rl.offline_difficulty == "measure" and rl.pilot
    assert rl.curriculum.fill_quota and rl.curriculum.pool_tiers and not rl.curriculum.domain_expansion
    assert rl.grpo.signal_rows_only
    assert rl.max_new_tokens >= 43 and demo.get_config().stages[1].eval.max_new_tokens >= 43   # gui's longest


def test_each_variant_set_gets_its_own_default_workdir():
    assert default_workdir("experiments/configs/demo.py") != default_workdir("experiments/configs/demo.py:smoke")
    assert default_workdir("d.py:seed=1,smoke") == default_workdir("d.py:smoke,seed=1")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_file_refuses_an_unknown_variant(name):
    module = importlib.import_module(f"experiments.configs.{name}")
    with pytest.raises(ValueError, match="unknown .*variants"):
        module.get_config("smoke,modle=tiny" if name == "demo" else "runlocal,modle=tiny")


def test_a_stage_config_restores_from_the_pipeline_config_with_its_tuples(tmp_path):
    """Stage directories of runs made before each had its own config.json read their stage's entry."""
    (tmp_path / "config.json").write_text(demo.get_config("smoke").to_json_best_effort())
    (tmp_path / "1_sft").mkdir()
    cfg = read_stage_config(tmp_path / "1_sft")
    assert cfg.stage == "sft" and cfg.model.text.mrope_section == (2, 3, 3)
    assert cfg.data.domains == tuple(demo.get_config("smoke").stages[1].data.domains)     # DataConfig's type
