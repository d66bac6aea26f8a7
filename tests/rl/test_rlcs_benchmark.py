"""benchmarks/rlcs.py at the demo's smoke settings: 2 updates per sampler from one freshly initialized
"SFT" checkpoint; the JSON's counts must agree with the settings and with each other. Also the RL stage's
compile-once pieces (rl/stage.py): the rollout's padded prompt count and its dropped padding rows, and the
GRPO update shared by run_rl calls with the same settings; and a stage update with kl_coef, entropy_coef and
grad_accum_steps on real rollouts."""
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks import rl_runs, rlcs
from experiments.configs import demo
from glmv_jax.evaluation.evaluate import prompt_records
from glmv_jax.generate.prompts import prompt_dicts
from glmv_jax.models.glmv import init_params
from glmv_jax.rl.grpo import GRPOConfig
from glmv_jax.rl.samplers import Iteration, PromptPool
from glmv_jax.rl.stage import (
    Rollouts,
    grpo_config,
    grpo_update_for,
    make_sampler,
    padded_rollout_size,
    train_iteration,
    update_seq_len,
)
from glmv_jax.train.checkpoint import Checkpointer
from glmv_jax.train.experiment import initial_params, param_shardings, setup
from glmv_jax.train.optimizer import build_optimizer
from glmv_jax.train.state import init_train_state, train_state_from_params

ITERATIONS = 2


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A stage directory as run_supervised leaves it (checkpoints/ + tokenizer.model), fresh params."""
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
        offline = h[0]["offline_rollouts"]                 # RLCS's pass@k on the pool, billed up front
        assert [x["cumulative_rollouts"] for x in h] == list(offline + np.cumsum([x["rollouts"] for x in h]))
        assert [x["cumulative_rollouts"] for x in h] == [x["rollouts_total"] for x in h]
        assert all(x["expansion"] == x["prompts_rolled_out"] / b and x["verifier_errors"] >= 0 for x in h)
        assert all(0.0 <= x["reward_rolled"] <= 1.0 for x in h)
        spent[name] = h[-1]["cumulative_rollouts"]
        assert data["summary"][name]["rollouts"]["mean"] == spent[name]
        assert data["summary"][name]["offline_rollouts"]["mean"] == offline
        assert (offline > 0) == (name == "rlcs")
        assert "greedy_delta" in data["summary"][name]["vs_sft"]
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
    assert rlcs.parse_args(["--samplers", "rlcs_labels"]).samplers == ["rlcs_labels"]
    with pytest.raises(FileNotFoundError, match="neither a stage directory"):
        rl_runs.find_sft_stage(Path("/nonexistent/sft"))


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
    return setup(cfg, str(tmp_path_factory.mktemp("rl")))


@pytest.fixture(scope="module")
def rl_pool(rl_exp):
    """(records, prompt dicts, params) of the RL stage's prompt pool, params as the stage starts from them."""
    exp, r = rl_exp, rl_exp.cfg.rl
    records = prompt_records(exp.cfg, "train", r.prompts_per_domain, seed=0, tiers=r.get("prompt_tiers"))
    return records, prompt_dicts(records, exp.tokenizer, exp.processor), initial_params(exp, *param_shardings(exp))


def test_padding_rows_are_dropped_and_leave_the_real_rows_unchanged(rl_exp, rl_pool):
    exp, r = rl_exp, rl_exp.cfg.rl
    records, prompts, params = rl_pool
    longest = int(np.argmax([len(p["input_ids"]) for p in prompts]))      # the padding prompt: same Tp
    indices = [longest] + [i for i in range(5) if i != longest][:4]
    outs = {}
    for steps, n in ((0, 4), (2, 5)):          # B=4: 4 prompts (8 rows), and 5 padded to 6 (12 rows)
        rollouts = Rollouts(exp, prompts, records, params, jax.random.key(3), pad_steps=steps)
        outs[steps] = (rollouts(np.asarray(indices[:n])), rollouts.trajectories(), rollouts)
    (plain, plain_t, plain_r), (padded, padded_t, padded_r) = outs[0], outs[2]
    g = r.group_size
    assert plain_r.padded == 0 and padded_r.padded == 1
    assert plain.shape == (4, g) and padded.shape == (5, g)
    assert plain_t.prompt_index[::g].tolist() == indices[:4] and padded_t.prompt_index[::g].tolist() == indices
    np.testing.assert_array_equal(padded[:4], plain)
    np.testing.assert_array_equal(padded_t.group_rewards(), padded)
    shared = padded_t.groups(range(4))          # the shared prompts: same rows, same draws
    assert shared.texts == plain_t.texts                                          # response texts
    np.testing.assert_array_equal(shared.tokens, plain_t.tokens)
    np.testing.assert_allclose(shared.logprobs, plain_t.logprobs, rtol=1e-5, atol=1e-5)
    assert padded_t.groups([4]).tokens.shape[0] == g


def test_the_labels_ablation_reaches_the_curriculum(sft_dir):
    pool = PromptPool.from_records([{"id": str(i), "domain": "m"} for i in range(8)])
    cfg = rlcs.rl_config(rlcs.parse_args(["--smoke"]), "rlcs", 0, sft_dir)
    curriculum = make_sampler(cfg, pool).cfg
    assert cfg.rl.offline_difficulty == "measure" and curriculum.fill_quota and curriculum.pool_tiers
    old = rlcs.rl_config(rlcs.parse_args(["--smoke"]), "rlcs_labels", 0, sft_dir)
    curriculum = make_sampler(old, pool).cfg
    assert old.rl.sampler == "rlcs" and old.rl.offline_difficulty == "labels" and not old.rl.pilot
    assert not curriculum.fill_quota and not curriculum.pool_tiers and curriculum.ema_decay == 0.8


def test_run_rl_calls_with_the_same_settings_share_one_grpo_update(rl_exp):
    optimizer, update = grpo_update_for(rl_exp, grpo_config(rl_exp.cfg.rl))
    again = grpo_update_for(rl_exp, grpo_config(rl_exp.cfg.rl))
    assert again[1] is update and again[0] is optimizer
    other = rl_exp.cfg.copy_and_resolve_references()
    other.optimizer.lr = float(other.optimizer.lr) * 2
    assert grpo_update_for(dataclasses.replace(rl_exp, cfg=other), grpo_config(other.rl))[1] is not update


def test_kl_entropy_and_grad_accumulation_reach_the_stage_update(rl_exp, rl_pool):
    """train_iteration on real rollouts with kl_coef (reference: the starting params), entropy_coef,
    grad_accum_steps 2 and recompute_old_logp: the update runs on the [M, k, ...] batch and reports the KL to
    the reference (0 at the first step, where the params are the reference) and the entropy."""
    exp, r = rl_exp, rl_exp.cfg.rl
    records, prompts, params = rl_pool
    rollouts = Rollouts(exp, prompts, records, params, jax.random.key(5))
    indices = np.arange(4)
    iteration = Iteration(indices, rollouts(indices), np.arange(4), {})
    cfg = GRPOConfig(num_minibatches=2, grad_accum_steps=2, kl_coef=0.05, entropy_coef=0.01, recompute_old_logp=True)
    optimizer, update = grpo_update_for(exp, cfg)
    state = train_state_from_params(jax.tree.map(jax.numpy.copy, params), optimizer, jax.random.key(0))
    state, row, metrics = train_iteration(exp, cfg, update, state, iteration, rollouts.trajectories(), prompts,
                                          update_seq_len(prompts, r.max_new_tokens), reference=params)
    assert row["updated"] == 1 and row["trained_groups"] == 4 and int(state.step) == 2
    assert metrics["first/kl_ref"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["first/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert np.isfinite(metrics["entropy"]) and metrics["entropy"] > 0.0 and np.isfinite(metrics["kl_ref"])
