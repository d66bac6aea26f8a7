"""benchmarks/rlcs.py at the demo's smoke settings: 2 updates per sampler from one freshly initialized
"SFT" checkpoint; the JSON's counts must agree with the settings and with each other. Also the RL stage's
compile-once pieces (rl/stage.py): the rollout's padded prompt count and its dropped padding rows, and the
GRPO update shared by run_rl calls with the same settings."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from benchmarks import rlcs
from glmv_jax.rl.stage import padded_rollout_size

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
    assert sorted(data["summary"]) == sorted(rlcs.DEFAULT_SAMPLERS)
    runs = {r["sampler"]: r for r in data["runs"]}
    assert sorted(runs) == sorted(rlcs.DEFAULT_SAMPLERS)
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
    assert all(x["padded_prompts"] == 0 for x in runs["uniform"]["history"])       # B prompts: no padding
    for x in runs["rlcs"]["history"]:     # padding copies to the ladder size, not counted in rollouts
        n = x["prompts_rolled_out"]
        assert n + x["padded_prompts"] == padded_rollout_size(n, b, 2)
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
    assert rlcs.parse_args(["--samplers", "rlcs_fill"]).samplers == ["rlcs_fill"]
    with pytest.raises(FileNotFoundError, match="neither a stage directory"):
        rlcs.find_sft_stage(rlcs.Path("/nonexistent/sft"))


def test_padded_rollout_sizes_follow_the_ladder():
    sizes = [padded_rollout_size(n, 14, 2) for n in range(1, 57)]
    assert sorted(set(sizes)) == [14, 20, 28, 40, 56]            # ceil(14 * 2^(k/2))
    assert all(s >= n and (n <= 14 or s <= n * 2 ** 0.5 + 1) for n, s in enumerate(sizes, 1))
    assert [padded_rollout_size(n, 4, 1) for n in (1, 4, 5, 8, 9)] == [4, 4, 8, 8, 16]
    assert [padded_rollout_size(n, 4, 0) for n in (1, 5, 7)] == [1, 5, 7]
    with pytest.raises(ValueError, match="steps >= 0"):
        padded_rollout_size(3, 4, -1)


@pytest.fixture(scope="module")
def rl_exp(sft_dir, tmp_path_factory):
    cfg = rlcs.rl_config(rlcs.parse_args(["--smoke"]), "rlcs", 0, sft_dir)
    from glmv_jax.train.experiment import setup
    return setup(cfg, str(tmp_path_factory.mktemp("rl")))


def test_padding_rows_are_dropped_and_leave_the_real_rows_unchanged(rl_exp):
    from glmv_jax.evaluation.evaluate import prompt_records
    from glmv_jax.generate.prompts import prompt_dicts
    from glmv_jax.rl.stage import Rollouts
    from glmv_jax.train.experiment import initial_params, param_shardings
    exp, r = rl_exp, rl_exp.cfg.rl
    records = prompt_records(exp.cfg, "train", r.prompts_per_domain, seed=0, tiers=r.get("prompt_tiers"))
    prompts = prompt_dicts(records, exp.tokenizer, exp.processor)
    params = initial_params(exp, *param_shardings(exp))
    longest = int(np.argmax([len(p["input_ids"]) for p in prompts]))      # the padding prompt: same Tp
    indices = [longest] + [i for i in range(5) if i != longest][:4]
    outs = {}
    for steps, n in ((0, 4), (2, 5)):          # B=4: 4 prompts (8 rows), and 5 padded to 6 (12 rows)
        rollouts = Rollouts(exp, prompts, records, lambda: params, jax.random.key(3))
        rollouts.pad_steps = steps
        outs[steps] = (rollouts(np.asarray(indices[:n])), rollouts)
    (plain, plain_r), (padded, padded_r) = outs[0], outs[2]
    assert plain_r.padded == 0 and padded_r.padded == 1
    assert plain.shape == (4, r.group_size) and padded.shape == (5, r.group_size)
    assert sorted(plain_r.done) == sorted(indices[:4]) and sorted(padded_r.done) == sorted(indices)
    np.testing.assert_array_equal(padded[:4], plain)
    for i in indices[:4]:                       # the shared prompts: same rows, same draws
        gen_plain, gen_padded = plain_r.done[i][0], padded_r.done[i][0]
        assert plain_r.done[i][2] == padded_r.done[i][2]                         # response texts
        np.testing.assert_array_equal(gen_padded["tokens"], gen_plain["tokens"])
        np.testing.assert_allclose(gen_padded["logprobs"], gen_plain["logprobs"], rtol=1e-5, atol=1e-5)
    assert padded_r.done[indices[4]][0]["tokens"].shape[0] == r.group_size


def test_fill_quota_config_reaches_the_curriculum(sft_dir):
    from glmv_jax.rl.curriculum import PromptPool
    from glmv_jax.rl.stage import make_sampler
    cfg = rlcs.rl_config(rlcs.parse_args(["--smoke"]), "rlcs_fill", 0, sft_dir)
    pool = PromptPool.from_records([{"id": str(i), "domain": "m"} for i in range(8)])
    assert cfg.rl.sampler == "rlcs" and make_sampler(cfg, pool).cfg.fill_quota is True
    plain = rlcs.rl_config(rlcs.parse_args(["--smoke"]), "rlcs", 0, sft_dir)
    assert make_sampler(plain, pool).cfg.fill_quota is False


def test_run_rl_calls_with_the_same_settings_share_one_grpo_update(rl_exp):
    from glmv_jax.rl.stage import grpo_update_for
    optimizer, update = grpo_update_for(rl_exp)
    assert grpo_update_for(rl_exp)[1] is update and grpo_update_for(rl_exp)[0] is optimizer
    other = rl_exp.cfg.copy_and_resolve_references()
    other.optimizer.lr = float(other.optimizer.lr) * 2
    assert grpo_update_for(dataclasses.replace(rl_exp, cfg=other))[1] is not update
