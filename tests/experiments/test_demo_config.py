"""The demo config's variants and the settings issue 11's measurements rest on."""
import pytest

from experiments.configs import demo
from experiments.run import default_workdir


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
