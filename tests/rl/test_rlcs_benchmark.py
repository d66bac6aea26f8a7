"""benchmarks/rlcs.py at the demo's smoke settings: 2 updates per sampler from one freshly initialized
"SFT" checkpoint; the JSON's counts must agree with the settings and with each other."""
import json

import jax
import numpy as np
import pytest

from benchmarks import rlcs

ITERATIONS = 2


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A stage directory as run_supervised leaves it (checkpoints/ + tokenizer.model), fresh params."""
    from experiments.configs import demo
    from glmv_jax.models.glmv import init_params
    from glmv_jax.train.checkpoint import Checkpointer
    from glmv_jax.train.experiment import setup
    from glmv_jax.train.optimizer import build_optimizer
    from glmv_jax.train.state import init_train_state
    path = tmp_path_factory.mktemp("sft")
    cfg = demo.get_config("smoke").stages[1]
    exp = setup(cfg, str(path))
    state = init_train_state(lambda k: init_params(exp.model_config, k), build_optimizer(cfg.optimizer),
                             jax.random.key(0))
    with Checkpointer(path / "checkpoints", save_every=1) as ckpt:
        ckpt.save(state, None, step=1)
    return path


@pytest.fixture(scope="module")
def report(sft_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rlcs.main(["--sft", str(sft_dir), "--out", str(out), "--smoke", "--iterations", str(ITERATIONS),
               "--no-results"])
    with open(out / "rlcs.json") as f:
        return json.load(f), out


def test_json_has_every_sampler_with_consistent_counts(report):
    data, out = report
    s = data["settings"]
    b, g = s["batch_size"], s["group_size"]
    assert (out / "rlcs.png").stat().st_size > 0
    assert sorted(data["summary"]) == sorted(rlcs.SAMPLERS)
    runs = {r["sampler"]: r for r in data["runs"]}
    assert sorted(runs) == sorted(rlcs.SAMPLERS)
    spent = {}
    for name, run in runs.items():
        h = run["history"]
        assert [x["iteration"] for x in h] == list(range(1, ITERATIONS + 1))
        for x in h:
            assert x["rollouts"] == x["prompts_rolled_out"] * g
            assert 0 <= x["trained_groups"] <= b and x["updated"] == int(x["trained_groups"] > 0)
            assert 0.0 <= x["informative_share"] <= 1.0 and 0.0 <= x["kept_informative_share"] <= 1.0
        assert [x["cumulative_rollouts"] for x in h] == list(np.cumsum([x["rollouts"] for x in h]))
        spent[name] = h[-1]["cumulative_rollouts"]
        assert data["summary"][name]["rollouts"]["mean"] == spent[name]
        assert set(run["eval"]["accuracy"]) == set(data["sft_eval"]["accuracy"])
        assert run["eval"]["mean"] == pytest.approx(np.mean(list(run["eval"]["accuracy"].values())))
    assert spent["uniform"] == ITERATIONS * b * g
    assert all(x["trained_groups"] == b for x in runs["uniform"]["history"] + runs["rlcs"]["history"])
    assert spent["dapo"] >= spent["uniform"] and spent["rlcs"] >= spent["uniform"]
    for x in runs["dapo"]["history"]:       # DAPO rolls out more only while short of informative groups
        rounds = x["prompts_rolled_out"] // b
        assert x["kept_informative_share"] == (1.0 if x["trained_groups"] else 0.0)
        assert rounds == s["dapo_max_rounds"] or x["trained_groups"] == b


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        rlcs.parse_args(["--samplers", "rlcs,greedy"])
    with pytest.raises(SystemExit):
        rlcs.parse_args(["--group-size", "1"])
    with pytest.raises(FileNotFoundError, match="neither a stage directory"):
        rlcs.find_sft_stage(rlcs.Path("/nonexistent/sft"))
