"""The RL stage: RLCS (or uniform / DAPO) prompt selection -> rollouts with the KV-cache sampler -> verifier
rewards -> group advantages -> the jitted GRPO update; checkpoints hold the train state and the sampler's
state, so a rerun resumes at the same iteration with the same draws.

Config block `rl` (experiments/configs/rl.py): sampler, batch_size (groups trained per iteration),
group_size, iterations, max_new_tokens, temperature, top_p, thinking_budget, style, prompts_per_domain,
prompt_tiers, curriculum (CurriculumConfig fields), grpo (GRPOConfig fields), save_every.

Compiles: the jitted GRPO update is cached per (model config, sampling temperature, optimizer config, GRPO
config, nonfinite policy) for the process (`grpo_update_for`), and its batches have one sequence length per
prompt pool (longest prompt + max_new_tokens), so repeated run_rl calls (benchmarks, tests) compile it once.
The rollout pads its prompt list to a ladder of sizes B * 2^(k / rl.rollout_pad_steps) (`padded_rollout_size`;
0 = no padding) with copies of the pool's longest prompt whose outputs are dropped, so RLCS's changing
expansion compiles generation a bounded number of times; padded rows count nowhere (rewards, metrics,
`rollouts`), the history reports them as `padded_prompts`.

Per-iteration history rows (also logs/metrics.jsonl) carry what a sampler comparison needs
(benchmarks/rlcs.py): `rollouts` (responses generated, DAPO's extra rounds and RLCS's expansion included),
`informative_share` (nonzero reward variance among the groups rolled out), `kept_informative_share` (among
the groups trained on), `trained_groups`, `updated` (0 when no group could be trained on: the update is
skipped) and `reward` (mean over the trained groups; `sampler/mean_reward` is over all rolled out).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np

from glmv_jax.rewards import compute_reward


def make_sampler(cfg, pool):
    from glmv_jax.rl.curriculum import CurriculumConfig, DAPOSampler, RLCSCurriculum, UniformSampler
    r = cfg.rl
    if r.sampler == "rlcs":
        return RLCSCurriculum(pool, CurriculumConfig(batch_size=r.batch_size, group_size=r.group_size, seed=cfg.seed,
                                                     **dict(r.get("curriculum", {}) or {})))
    if r.sampler == "uniform":
        return UniformSampler(pool, r.batch_size, seed=cfg.seed)
    if r.sampler == "dapo":
        return DAPOSampler(pool, r.batch_size, seed=cfg.seed, max_rounds=r.get("dapo_max_rounds", 4))
    raise ValueError(f"unknown rl.sampler {r.sampler!r}; expected rlcs, uniform or dapo")


def padded_rollout_size(n: int, batch_size: int, steps: int) -> int:
    """The prompt count a rollout of n prompts is padded to: the smallest ceil(B * 2^(k / steps)), k >= 0, that
    holds n (steps 0: n itself). B=14, steps=2: 14, 20, 28, 40, 56, ... (at most 2^(1/steps) - 1 padding)."""
    if n < 1 or batch_size < 1 or steps < 0:
        raise ValueError(f"need n >= 1, batch_size >= 1 and steps >= 0, got {n}, {batch_size}, {steps}")
    if steps == 0:
        return n
    k = max(0, math.ceil(steps * math.log2(n / batch_size) - 1e-9))
    while math.ceil(batch_size * 2 ** (k / steps) - 1e-9) < n:
        k += 1
    return math.ceil(batch_size * 2 ** (k / steps) - 1e-9)


@functools.lru_cache(maxsize=8)
def _cached_update(model_config, temperature: float, optimizer_json: str, grpo_cfg, nonfinite: str, mesh,
                   rules_repr: str):
    del mesh, rules_repr                  # keys only: a new mesh or rules table traces afresh
    from glmv_jax.rl.grpo import make_grpo_update, make_model_logp_fn
    from glmv_jax.train.optimizer import build_optimizer
    optimizer = build_optimizer(json.loads(optimizer_json))
    update = make_grpo_update(make_model_logp_fn(model_config, temperature=temperature), optimizer, grpo_cfg,
                              presplit=True, nonfinite=nonfinite)
    return optimizer, update


def grpo_update_for(exp):
    """(optimizer, jitted presplit GRPO update) of an experiment, shared by every run_rl in the process with
    the same model, temperature, optimizer, GRPO and nonfinite settings, mesh and rules (jax.jit then reuses
    its compiles for the shapes it has seen)."""
    from glmv_jax.rl.grpo import GRPOConfig
    cfg, r = exp.cfg, exp.cfg.rl
    optimizer_cfg = cfg.optimizer.to_dict() if hasattr(cfg.optimizer, "to_dict") else dict(cfg.optimizer)
    return _cached_update(exp.model_config, float(r.temperature), json.dumps(optimizer_cfg, sort_keys=True),
                          GRPOConfig(**dict(r.get("grpo", {}) or {})), str(cfg.train.nonfinite), exp.mesh,
                          repr(exp.rules))


def _subset_generation(gen: dict, rows: np.ndarray) -> dict:
    return {k: (v[rows] if isinstance(v, np.ndarray) and v.ndim >= 1 and k != "batch" else v)
            for k, v in gen.items() if k != "batch"}


class Rollouts:
    """rollout_fn(indices) -> rewards [n, G], remembering every rollout of the iteration for the update."""

    def __init__(self, exp, prompts, records, params_ref, rng):
        from glmv_jax.generate.sampler import answer_ids
        self.exp, self.prompts, self.records, self.params_ref, self.rng = exp, prompts, records, params_ref, rng
        r = exp.cfg.rl
        self.force, extra = answer_ids(exp.tokenizer, r.style)
        self.stops = tuple(exp.tokenizer.stop_ids) + tuple(extra)
        self.done: dict[int, tuple[dict, np.ndarray, list[str]]] = {}   # prompt index -> (gen rows, rewards, texts)
        self.iteration, self.calls = 0, 0     # the sampling key of a call: rng folded with both
        self.pad_steps = int(r.get("rollout_pad_steps", 0) or 0)
        self.padded = 0                       # padding prompts generated this iteration (outputs dropped)
        self.longest = int(np.argmax([len(p["input_ids"]) for p in prompts]))   # the padding prompt

    def __call__(self, indices) -> np.ndarray:
        from glmv_jax.rl.rollout import rollout_batch
        r, tok = self.exp.cfg.rl, self.exp.tokenizer
        self.calls += 1
        size = padded_rollout_size(len(indices), r.batch_size, self.pad_steps)
        self.padded += size - len(indices)
        rows = [int(i) for i in indices] + [self.longest] * (size - len(indices))
        out = rollout_batch(self.exp.model_config, self.params_ref(), [self.prompts[i] for i in rows],
                            num_samples=r.group_size, max_new_tokens=r.max_new_tokens, stop_ids=self.stops,
                            rng=jax.random.fold_in(jax.random.fold_in(self.rng, self.iteration), self.calls), temperature=r.temperature, top_p=r.top_p,
                            thinking_budget=r.get("thinking_budget"), force_answer_ids=self.force, tokenizer=tok)
        g = r.group_size
        rewards = np.zeros((len(indices), g), np.float32)
        for j, i in enumerate(indices):
            rec = self.records[i]
            rows = np.arange(j * g, (j + 1) * g)
            texts = [out["responses"][k] for k in rows]
            rewards[j] = [compute_reward(rec["domain"], t, rec["answer"], style=r.style).reward for t in texts]
            self.done[int(i)] = (_subset_generation(out["generation"], rows), rewards[j], texts)
        return rewards


def trainable_groups(kept_indices: np.ndarray, group_size: int, num_minibatches: int) -> np.ndarray:
    """The kept groups the update can take: the first n with n * group_size divisible by num_minibatches
    (a DAPO iteration that ran out of rounds may keep any number of groups; B * G itself must divide)."""
    n = len(kept_indices)
    while n and (n * group_size) % num_minibatches:
        n -= 1
    return kept_indices[:n]


def update_seq_len(prompts: list[dict], max_new_tokens: int) -> int:
    """The GRPO batches' one sequence length for a prompt pool: its longest prompt + max_new_tokens, bucketed."""
    from glmv_jax.batch import bucket
    return bucket(max(len(p["input_ids"]) for p in prompts) + int(max_new_tokens), 16)


def update_batch(exp, rollouts: Rollouts, kept_indices: np.ndarray, seq_len: int | None = None) -> tuple[dict, dict]:
    """The GRPO batch over the kept groups (presplit into minibatches, rows padded to seq_len) and rollout
    statistics."""
    from glmv_jax.rl.grpo import group_advantages
    from glmv_jax.rl.rollout import assemble_batch
    r = exp.cfg.rl
    gens = [rollouts.done[int(i)] for i in kept_indices]
    gen = {k: np.concatenate([g[0][k] for g in gens]) for k in gens[0][0]}
    rewards = np.stack([g[1] for g in gens])
    adv = np.asarray(group_advantages(rewards, normalize_std=r.get("grpo", {}).get("normalize_std", True)))
    prompts = [rollouts.prompts[int(i)] for i in kept_indices]
    m = int((r.get("grpo", {}) or {}).get("num_minibatches", 1))
    batch = assemble_batch(prompts, r.group_size, gen, num_minibatches=m, seq_len=seq_len,
                           merge_area=exp.model_config.vision.spatial_merge_size ** 2)
    batch["advantages"] = adv.reshape(m, -1).astype(np.float32)
    lengths = gen["lengths"].astype(np.float32)
    stats = {"reward": float(rewards.mean()), "response_length": float(lengths.mean()),
             "truncated_rate": float(gen["truncated"].mean()), "forced_rate": float(gen["forced"].mean())}
    return batch, stats


def run_rl(exp) -> dict[str, Any]:
    from glmv_jax.rl.curriculum import PromptPool
    from glmv_jax.evaluation.evaluate import prompt_records
    from glmv_jax.generate.prompts import prompt_dicts
    from glmv_jax.train.checkpoint import Checkpointer
    from glmv_jax.train.experiment import initial_params, param_shardings
    from glmv_jax.train.metrics import MetricsWriter
    from glmv_jax.train.state import abstract_train_state, init_train_state, train_state_from_params
    from glmv_jax.models.glmv import init_params

    cfg, r = exp.cfg, exp.cfg.rl
    records = prompt_records(cfg, "train", r.prompts_per_domain, seed=cfg.seed, tiers=r.get("prompt_tiers"))
    prompts = prompt_dicts(records, exp.tokenizer, exp.processor)
    sampler = make_sampler(cfg, PromptPool.from_records(records))
    optimizer, update = grpo_update_for(exp)
    seq_len = update_seq_len(prompts, r.max_new_tokens)
    abstract_params, shardings = param_shardings(exp)
    rng = jax.random.key(cfg.seed)

    def fresh():
        params = initial_params(exp, abstract_params, shardings)
        if params is None:
            return init_train_state(lambda k: init_params(exp.model_config, k), optimizer, rng)
        return train_state_from_params(params, optimizer, rng)

    history, state_box = [], {}
    with Checkpointer(os.path.join(exp.workdir, "checkpoints"), save_every=r.save_every, keep=cfg.train.keep) as ckpt:
        restored = ckpt.restore_latest(abstract_train_state(optimizer, abstract_params, None, rng))
        if restored is None:
            state = fresh()
        else:
            state, sampler_state = restored
            sampler.set_state(sampler_state)
        start = sampler.iteration
        state_box["params"] = state.params
        rollouts = Rollouts(exp, prompts, records, lambda: state_box["params"], jax.random.fold_in(rng, 7))
        with MetricsWriter(os.path.join(exp.workdir, "logs"), r.iterations, initial_step=start,
                           description="rl") as writer:
            minibatches = int((r.get("grpo", {}) or {}).get("num_minibatches", 1))
            for it in range(start, r.iterations):
                t0 = time.perf_counter()
                rollouts.done.clear()
                rollouts.iteration, rollouts.padded = it, 0
                iteration = sampler.run_iteration(rollouts)
                kept = trainable_groups(iteration.indices[iteration.kept], r.group_size, minibatches)
                metrics, stats = {}, {"reward": float("nan")}
                if len(kept):            # no trainable group (DAPO out of rounds): no update this iteration
                    batch, stats = update_batch(exp, rollouts, kept, seq_len)
                    state, metrics = update(state, batch)
                    state_box["params"] = state.params
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
                zero_var = float(np.mean(np.std(iteration.rewards, axis=1) <= 1e-6))
                kept_rewards = iteration.rewards[iteration.kept[:len(kept)]]
                row = {"iteration": it + 1, **stats, "informative_share": 1.0 - zero_var,
                       "kept_informative_share": float(np.mean(np.std(kept_rewards, axis=1) > 1e-6))
                       if len(kept) else 0.0,
                       "trained_groups": int(len(kept)), "updated": int(len(kept) > 0),
                       "prompts_rolled_out": int(len(iteration.indices)),
                       "rollouts": int(len(iteration.indices) * r.group_size), "rollout_rounds": rollouts.calls,
                       "padded_prompts": rollouts.padded,
                       "seconds": time.perf_counter() - t0,
                       **{f"grpo/{k}": v for k, v in metrics.items()},
                       **{f"sampler/{k}": float(v) for k, v in iteration.metrics.items() if np.ndim(v) == 0}}
                rollouts.calls = 0
                history.append(row)
                writer.write(it + 1, row)
                if (it + 1) % r.save_every == 0 or it + 1 == r.iterations:
                    ckpt.save(state, sampler.get_state(), it + 1)
    return {"stage": "rl", "start_step": start, "steps": r.iterations, "state": state, "history": history,
            "first_reward": history[0]["reward"] if history else float("nan"),
            "last_reward": float(np.mean([h["reward"] for h in history[-5:]])) if history else float("nan")}
