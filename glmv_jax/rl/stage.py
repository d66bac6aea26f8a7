"""The RL stage. One iteration: the sampler (RLCS, uniform or DAPO) proposes prompts -> `Rollouts` samples
them with the KV-cache sampler at the current params and scores them with the verifiers (rewards [n, G] back
to the sampler, Trajectories kept) -> the sampler keeps groups -> grpo.group_stats over the rollout (shares
of informative groups, advantages) -> the GRPO batch, built once for the kept groups -> the jitted update.
Checkpoints hold the train state and the sampler's state, so a rerun resumes at the same iteration with the
same draws.

Config block `rl` (experiments/configs/rl.py): sampler, batch_size (groups trained per iteration),
group_size, iterations, max_new_tokens, temperature, top_p, thinking_budget, compact_every (generate's: finished
rollout rows dropped every N decode steps; 0 = one loop), style, prompts_per_domain,
prompt_tiers, curriculum (CurriculumConfig fields), grpo (GRPOConfig fields, all honoured: kl_coef > 0 takes
the starting policy (train.init_from, the HF checkpoint or the seeded init) as the reference, entropy_coef > 0
has the model's logp_fn return entropy, grad_accum_steps splits every minibatch into micro-batches), save_every,
domains (None: every data domain; else the RL pool's domains, e.g. one for single-domain RL), reward_overrides
({domain: weakened verifier name}, rewards/weak.py: the weak-verifier experiment), health (HealthConfig fields:
the reward-health guard, rl/health.py; history rows of check iterations carry `health/<domain>/*`).

Compiles: the jitted GRPO update is cached per (model config, sampling temperature, optimizer config, GRPO
config, nonfinite policy) for the process (`grpo_update_for`), and its batches have one sequence length per
prompt pool (longest prompt + max_new_tokens), so repeated run_rl calls (benchmarks, tests) compile it once.
The rollout pads its prompt list to a ladder of sizes B * 2^(k / rl.rollout_pad_steps) (`padded_rollout_size`;
0 = no padding) with copies of the pool's longest prompt whose outputs are dropped, so RLCS's changing
expansion compiles generation a bounded number of times; padded rows count nowhere (rewards, metrics,
`rollouts`), the history reports them as `padded_prompts`.

Per-iteration history rows (also logs/metrics.jsonl) carry what a sampler comparison needs
(benchmarks/rlcs.py, docs/rl.md "The RL stage"):
- rewards: `reward_rolled` (mean over ALL rolled-out groups: what the policy does on the prompts it was given)
  beside `reward_kept` (= `reward`, the trained groups: RLCS and DAPO keep the most balanced groups, so it
  rises by selection alone), both per domain (`reward_rolled/<domain>`, `reward_kept/<domain>`);
- informative groups (nonzero reward variance, grpo.group_stats with the stage's GRPOConfig):
  `informative_share_rolled` (= `informative_share`) and `informative_share_trained` (= `kept_informative_share`);
- cost: `rollouts` (responses generated this iteration, DAPO's extra rounds and RLCS's expansion included),
  `rollouts_total` (cumulative, RLCS's offline pass@k rollouts included), `offline_rollouts` (that pass alone),
  `expansion` (prompts rolled out / B) and, with per-domain expansion, `expansion/<domain>` (the EMAs that
  sized the rollout);
- the update: `entropy` (sampled-token estimate unless entropy_coef > 0), `clip_fraction`, `grpo/*`;
- `trained_groups`, `updated` (0 when no group could be trained on: the update is skipped),
  `verifier_errors` (responses whose RewardResult.info reason is "verifier_error": scored 0), `sampler/*`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from glmv_jax.batch import bucket
from glmv_jax.data.pipeline import image_checks
from glmv_jax.evaluation.baselines import most_common_rewards
from glmv_jax.evaluation.evaluate import check_answer_budget, prompt_records
from glmv_jax.generate.prompts import prompt_dicts
from glmv_jax.generate.sampler import answer_ids
from glmv_jax.models.glmv import init_params
from glmv_jax.rewards import compute_rewards
from glmv_jax.rewards.registry import verifier_for
from glmv_jax.rl.curriculum import CurriculumConfig, RLCSCurriculum
from glmv_jax.rl.grpo import GRPOConfig, group_stats, make_grpo_update, make_model_logp_fn
from glmv_jax.rl.health import HealthConfig, RewardHealthMonitor, window_reward
from glmv_jax.rl.pilot import measure_pool, offline_subset, pilot_ratios, spread_difficulty
from glmv_jax.rl.rollout import Trajectories, grpo_batch, rollout
from glmv_jax.rl.samplers import DAPOSampler, Iteration, PromptPool, UniformSampler
from glmv_jax.train.checkpoint import Checkpointer
from glmv_jax.train.experiment import initial_params, param_shardings
from glmv_jax.train.metrics import MetricsWriter, read_metrics
from glmv_jax.train.optimizer import build_optimizer
from glmv_jax.train.state import abstract_train_state, init_train_state, train_state_from_params


SAMPLERS = ("rlcs", "uniform", "dapo")


def make_sampler(cfg, pool, domain_ratios: dict[str, float] | None = None):
    """The configured sampler over `pool`; `domain_ratios` (the pilot's mix) overrides the curriculum's."""
    r = cfg.rl
    if r.sampler == "rlcs":
        options = dict(r.get("curriculum", {}) or {})
        if domain_ratios is not None:
            options["domain_ratios"] = domain_ratios
        return RLCSCurriculum(pool, CurriculumConfig(batch_size=r.batch_size, group_size=r.group_size, seed=cfg.seed,
                                                     **options))
    if r.sampler == "uniform":
        return UniformSampler(pool, r.batch_size, seed=cfg.seed)
    if r.sampler == "dapo":
        return DAPOSampler(pool, r.batch_size, seed=cfg.seed, max_rounds=r.get("dapo_max_rounds", 4))
    raise ValueError(f"unknown rl.sampler {r.sampler!r}; expected one of {SAMPLERS}")


def grpo_config(rl) -> GRPOConfig:
    """The stage's GRPOConfig from its `rl.grpo` block (built once per run)."""
    return GRPOConfig(**dict(rl.get("grpo", {}) or {}))


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
def _cached_update(model_config, temperature: float, optimizer_json: str, grpo_cfg: GRPOConfig, nonfinite: str, mesh,
                   rules_repr: str):
    del mesh, rules_repr                  # keys only: a new mesh or rules table traces afresh
    optimizer = build_optimizer(json.loads(optimizer_json))
    logp_fn = make_model_logp_fn(model_config, temperature=temperature, with_entropy=grpo_cfg.entropy_coef > 0)
    update = make_grpo_update(logp_fn, optimizer, grpo_cfg, presplit=True, nonfinite=nonfinite)
    return optimizer, update


def grpo_update_for(exp, grpo_cfg: GRPOConfig):
    """(optimizer, jitted presplit GRPO update) of an experiment, shared by every run_rl in the process with
    the same model, temperature, optimizer, GRPO and nonfinite settings, mesh and rules (jax.jit then reuses
    its compiles for the shapes it has seen)."""
    cfg = exp.cfg
    optimizer_cfg = cfg.optimizer.to_dict() if hasattr(cfg.optimizer, "to_dict") else dict(cfg.optimizer)
    return _cached_update(exp.model_config, float(cfg.rl.temperature), json.dumps(optimizer_cfg, sort_keys=True),
                          grpo_cfg, str(cfg.train.nonfinite), exp.mesh, repr(exp.rules))


def score_groups(records: list[dict], traj: Trajectories, style: str,
                 overrides: dict[str, str] | None = None) -> tuple[np.ndarray, int]:
    """Verifier rewards [num_groups, G] of trajectories with texts (group j answers records[prompt_index]) and
    how many of them are verifier errors (RewardResult.info["reason"] == "verifier_error", reward 0).
    overrides: {domain: weakened verifier name} scoring those domains instead of their real verifiers."""
    g, overrides = traj.group_size, overrides or {}
    rewards, errors = np.zeros((traj.num_groups, g), np.float32), 0
    for j in range(traj.num_groups):
        rec = records[int(traj.prompt_index[j * g])]
        results = compute_rewards(rec["domain"], list(traj.texts[j * g:(j + 1) * g]), rec["answer"], style=style,
                                  verifier_override=overrides.get(rec["domain"]))
        rewards[j] = [x.reward for x in results]
        errors += sum(x.info.get("reason") == "verifier_error" for x in results)
    return rewards, errors


class Rollouts:
    """One iteration's rollout_fn at fixed params: rollouts(indices) -> rewards [n, G] for the sampler; every
    call's scored Trajectories (prompt_index: pool indices) are kept in call order for the update, and
    `verifier_errors` counts the responses whose verifier failed.

    The sampling key of call c (1, 2, ...) is rng folded with c. The prompt list is padded to
    padded_rollout_size(n, B, pad_steps) with copies of the pool's longest prompt, whose rows are dropped
    before scoring; `padded` counts them. num_samples: responses per prompt (default rl.group_size);
    overrides: score_groups's weakened verifiers (None: the real ones)."""

    def __init__(self, exp, prompts: list[dict], records: list[dict], params, rng, *, pad_steps: int = 0,
                 num_samples: int | None = None, overrides: dict[str, str] | None = None):
        self.exp, self.prompts, self.records, self.params, self.rng = exp, prompts, records, params, rng
        self.pad_steps, self.padded, self.verifier_errors = int(pad_steps), 0, 0
        self.num_samples = int(num_samples or exp.cfg.rl.group_size)
        self.overrides = dict(overrides or {})
        self.force, extra = answer_ids(exp.tokenizer, exp.cfg.rl.style)
        self.stops = tuple(exp.tokenizer.stop_ids) + tuple(extra)
        self.longest = int(np.argmax([len(p["input_ids"]) for p in prompts]))   # the padding prompt
        self.parts: list[Trajectories] = []

    @property
    def calls(self) -> int:
        return len(self.parts)

    def __call__(self, indices) -> np.ndarray:
        r = self.exp.cfg.rl
        n = len(indices)
        size = padded_rollout_size(n, r.batch_size, self.pad_steps)
        rows = np.asarray([int(i) for i in indices] + [self.longest] * (size - n), int)
        traj = rollout(self.exp.model_config, self.params, [self.prompts[i] for i in rows], num_samples=self.num_samples,
                       max_new_tokens=r.max_new_tokens, stop_ids=self.stops,
                       rng=jax.random.fold_in(self.rng, self.calls + 1), temperature=r.temperature, top_p=r.top_p,
                       thinking_budget=r.get("thinking_budget"), force_answer_ids=self.force,
                       tokenizer=self.exp.tokenizer, compact_every=int(r.get("compact_every", 0) or 0)).groups(range(n))
        traj = dataclasses.replace(traj, prompt_index=rows[traj.prompt_index])
        rewards, errors = score_groups(self.records, traj, r.style, self.overrides)
        self.parts.append(traj.scored(rewards))
        self.padded += size - n
        self.verifier_errors += errors
        return rewards

    def trajectories(self) -> Trajectories:
        """Every call's trajectories, in call order (group p answers the p-th prompt rolled out)."""
        return Trajectories.concatenate(self.parts)


def trainable_groups(kept: np.ndarray, group_size: int, parts: int) -> np.ndarray:
    """The kept groups the update can take: the first n with n * group_size divisible by parts (num_minibatches
    x grad_accum_steps; a DAPO iteration that ran out of rounds may keep any number of groups; B * G itself
    must divide)."""
    n = len(kept)
    while n and (n * group_size) % parts:
        n -= 1
    return kept[:n]


def update_seq_len(prompts: list[dict], max_new_tokens: int) -> int:
    """The GRPO batches' one sequence length for a prompt pool: its longest prompt + max_new_tokens, bucketed."""
    return bucket(max(len(p["input_ids"]) for p in prompts) + int(max_new_tokens), 16)


def train_iteration(exp, grpo_cfg: GRPOConfig, update, state, iteration: Iteration, traj: Trajectories,
                    prompts: list[dict], seq_len: int, reference=None, domains: Sequence[str] | None = None):
    """Group statistics of the rollout, the GRPO batch of the kept groups the update can take, the update
    (skipped when there is none; `reference`: the KL reference params, needed when kl_coef > 0)
    -> (state, history row entries, the update's scalar metrics). `domains[i]`: the domain of pool prompt i
    (per-domain rewards over the rolled-out and the kept groups)."""
    if not np.array_equal(traj.prompt_index[::traj.group_size], iteration.indices):
        raise ValueError("the sampler's rolled-out prompts do not match the rollouts' trajectories")
    stats = group_stats(iteration.rewards, **grpo_cfg.advantage_settings)
    kept = trainable_groups(iteration.kept, traj.group_size, grpo_cfg.num_minibatches * grpo_cfg.grad_accum_steps)
    row, metrics = {"reward": float("nan")}, {}
    if len(kept):            # no trainable group (DAPO out of rounds): no update this iteration
        chosen = traj.groups(kept)
        batch = grpo_batch(prompts, chosen, stats.advantages[kept].reshape(-1),
                           num_minibatches=grpo_cfg.num_minibatches, grad_accum_steps=grpo_cfg.grad_accum_steps,
                           seq_len=seq_len, merge_area=exp.model_config.vision.spatial_merge_size ** 2)
        state, metrics = update(state, batch) if reference is None else update(state, batch, reference)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
        row = {"reward": float(chosen.rewards.mean()),
               "response_length": float(chosen.lengths.astype(np.float32).mean()),
               "truncated_rate": float(chosen.truncated.mean()), "forced_rate": float(chosen.forced.mean())}
    row.update({"informative_share": 1.0 - float(np.mean(stats.zero_variance)),
                "kept_informative_share": float(np.mean(~stats.zero_variance[kept])) if len(kept) else 0.0,
                "trained_groups": int(len(kept)), "updated": int(len(kept) > 0),
                "prompts_rolled_out": int(len(iteration.indices)), "rollouts": int(len(traj.prompt_index))})
    row.update(honest_metrics(iteration, kept, row, metrics, domains))
    return state, row, metrics


def honest_metrics(iteration: Iteration, kept: np.ndarray, row: dict, metrics: dict,
                   domains: Sequence[str] | None) -> dict[str, float]:
    """The rewards of ALL rolled-out groups beside those of the kept (trained) groups, overall and per domain:
    RLCS and DAPO keep the most balanced groups, so the kept groups' reward rises by selection alone.
    Also the informative shares under their contract names, and the update's entropy and clip fraction."""
    rewards = np.asarray(iteration.rewards, np.float64)
    out = {"reward_rolled": float(rewards.mean()), "reward_kept": row["reward"],
           "informative_share_rolled": row["informative_share"],
           "informative_share_trained": row["kept_informative_share"],
           "entropy": metrics.get("entropy", metrics.get("neg_logp", float("nan"))),
           "clip_fraction": metrics.get("clip_frac", float("nan"))}
    if domains is not None:
        rolled = np.asarray([domains[int(i)] for i in iteration.indices])
        kept_domains = rolled[kept] if len(kept) else np.asarray([], str)
        for name in sorted(set(rolled)):
            out[f"reward_rolled/{name}"] = float(rewards[rolled == name].mean())
            mine = kept_domains == name
            out[f"reward_kept/{name}"] = float(rewards[kept][mine].mean()) if mine.any() else float("nan")
    return out


def expansion_entries(sampler) -> dict[str, float]:
    """`expansion/<domain>`: RLCS's per-domain ratio EMAs that size the next rollout (with domain_expansion);
    the stage adds `expansion`, the prompts rolled out per group trained (B) in the iteration, any sampler."""
    cfg = getattr(sampler, "cfg", None)
    if cfg is None or not (cfg.expansion and cfg.domain_expansion):
        return {}
    return {f"expansion/{name}": float(e) for name, e in zip(sampler.pool.domains, sampler.domain_ema)}


def offline_pass(exp, records: list[dict], fresh) -> tuple[list[dict], dict[str, float] | None, int]:
    """rl.offline_difficulty = "measure" (RLCS): the starting policy's pass rates (rl.offline_samples = k
    samples each) on rl.offline_prompts prompts per domain (0: the whole pool) replace the records' difficulty
    labels (unmeasured prompts: their (domain, tier) cell's measured mean), and rl.pilot (default on) sets the
    domain mix from them (logged per domain), dropping domains whose measured reward does not lead the blind
    most-common-answer prior by rl.pilot_min_lead_se paired SEs (None: no such check).
    -> (records, domain ratios or None, rollouts the pass spent: billed whether or not the cache held it). Cached in the stage directory (pilot.measure_pool)."""
    r = exp.cfg.rl
    if r.sampler != "rlcs" or r.get("offline_difficulty", "labels") != "measure":
        return records, None, 0
    k = int(r.get("offline_samples", 4))
    subset = offline_subset(records, int(r.get("offline_prompts", 0) or 0))
    measured = measure_pool(exp, lambda: fresh().params, subset, k=k, cache_dir=exp.workdir)
    records = [{**rec, "difficulty": d} for rec, d in zip(records, spread_difficulty(records, measured))]
    ratios = None
    if r.get("pilot", True):
        lead_se = r.get("pilot_min_lead_se")
        blind = None if lead_se is None else most_common_rewards(records, subset, r.style)
        ratios, notes = pilot_ratios(records, measured, r.group_size, float(r.get("pilot_min_informative", 0.05)),
                                     blind=blind, min_lead_se=float(lead_se or 0.0),
                                     blind_weight=float(r.get("pilot_blind_weight", 0.0)))
        for note in notes:
            logging.warning("RL pilot: %s", note)
    return records, ratios, len(subset) * k


def rl_domains(cfg) -> tuple[str, ...] | None:
    """rl.domains (None: every domain of the data), checked against the data's domains."""
    chosen = cfg.rl.get("domains")
    if chosen is None:
        return None
    chosen = (chosen,) if isinstance(chosen, str) else tuple(chosen)
    known = tuple(cfg.data.domains)
    if not chosen or set(chosen) - set(known):
        raise ValueError(f"rl.domains {list(chosen)} must be a non-empty subset of data.domains {list(known)}")
    return chosen


def pool_records(cfg, split: str, per_domain: int, tiers=None) -> list[dict]:
    """prompt_records of the RL stage's domains (rl.domains)."""
    records, chosen = prompt_records(cfg, split, per_domain, seed=cfg.seed, tiers=tiers), rl_domains(cfg)
    return records if chosen is None else [rec for rec in records if rec["domain"] in chosen]


def reward_overrides(cfg, domains: Sequence[str]) -> dict[str, str]:
    """rl.reward_overrides {domain: weakened verifier}, each domain one of the pool's and each name known."""
    overrides = dict(cfg.rl.get("reward_overrides", {}) or {})
    for domain, name in overrides.items():
        if domain not in domains:
            raise ValueError(f"rl.reward_overrides names {domain!r}, not a domain of the RL pool {sorted(domains)}")
        verifier_for(domain, name)                       # raises for an unknown name
        logging.warning("RL rewards for %r come from the WEAKENED verifier %r (rl.reward_overrides); evaluation "
                        "and the reward-health probe use the real one", domain, name)
    return overrides


def split_probe(cfg, records: list[dict], per_domain: int) -> tuple[list[dict], list[dict]]:
    """(RL pool, reward-health probe set): the synthetic suite's own "probe" split (tiers of the RL pool), or,
    from manifests, the last per_domain prompts of each domain, taken out of the pool."""
    if cfg.data.source == "synthetic":
        return records, pool_records(cfg, "probe", per_domain, cfg.rl.get("prompt_tiers"))
    probe = [rec for d in sorted({x["domain"] for x in records})
             for rec in [x for x in records if x["domain"] == d][-per_domain:]]
    held = {id(x) for x in probe}
    return [x for x in records if id(x) not in held], probe


class HealthProbe:
    """The reward-health guard's fixed probe set and its scores at given params: per domain the per-prompt
    mean reward of probe_samples responses at the rollout temperature, under the real verifiers and under the
    run's training verifiers (rl.reward_overrides) on the same responses."""

    def __init__(self, exp, hc: HealthConfig, records: list[dict], pad_steps: int, overrides: dict[str, str]):
        self.exp, self.hc, self.pad_steps, self.records, self.overrides = exp, hc, pad_steps, records, overrides
        self.prompts = prompt_dicts(self.records, exp.tokenizer, exp.processor, **image_checks(exp.cfg.data))
        self.domains = np.asarray([rec["domain"] for rec in self.records])

    def __call__(self, params, rng) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
        """({domain: [n] per-prompt mean real reward}, the same under the training verifiers, responses made)."""
        rollouts = Rollouts(self.exp, self.prompts, self.records, params, rng, pad_steps=self.pad_steps,
                            num_samples=self.hc.probe_samples)
        real = rollouts(np.arange(len(self.prompts)))
        trained = score_groups(self.records, rollouts.trajectories(), self.exp.cfg.rl.style,
                               self.overrides)[0] if self.overrides else real
        by_domain = lambda x: {d: x.mean(axis=1)[self.domains == d] for d in sorted(set(self.domains))}
        return by_domain(real), by_domain(trained), real.size


def check_health(monitor: RewardHealthMonitor, probe: HealthProbe, sampler, params, rng, iteration: int,
                 window: list[dict]) -> dict[str, float]:
    """One reward-health check after `iteration` over the history rows of its window: probe, compare, log and
    apply the flags (Sampler.scale_domains) -> the row's `health/*` entries."""
    real, trained, spent = probe(params, rng)
    train = {d: window_reward(window, d) for d in monitor.domains}
    metrics, newly = monitor.check(iteration, train, real, trained)
    for domain in newly:
        logging.warning("%s", monitor.describe(domain))
    sampler.scale_domains(monitor.scale)
    return {**metrics, "health/probe_rollouts": spent}


def run_rl(exp) -> dict[str, Any]:
    cfg, r = exp.cfg, exp.cfg.rl
    # RL prompts come from their own stream (split "rl"): disjoint from the SFT records and the held-out set
    records = pool_records(cfg, r.get("prompt_split", "rl"), r.prompts_per_domain, r.get("prompt_tiers"))
    hc = HealthConfig(**dict(r.get("health", {}) or {}))
    records, probe_records = split_probe(cfg, records, hc.probe_per_domain) if hc.every else (records, [])
    overrides = reward_overrides(cfg, sorted({rec["domain"] for rec in records}))
    check_answer_budget(cfg, exp.tokenizer, r.get("prompt_split", "rl"), r.prompts_per_domain, cfg.seed,
                        r.get("prompt_tiers"), r.max_new_tokens, "rl")
    ev = cfg.get("eval")
    if ev:                    # the held-out evaluation after this stage: refuse now, not after the run
        check_answer_budget(cfg, exp.tokenizer, "heldout", ev.get("per_domain", 32), ev.get("seed", 0),
                            ev.get("tiers"), ev.get("max_new_tokens", 48), "eval")
    prompts = prompt_dicts(records, exp.tokenizer, exp.processor, **image_checks(cfg.data))
    grpo_cfg = grpo_config(r)
    optimizer, update = grpo_update_for(exp, grpo_cfg)
    seq_len = update_seq_len(prompts, r.max_new_tokens)
    pad_steps = int(r.get("rollout_pad_steps", 0) or 0)
    abstract_params, shardings = param_shardings(exp)
    rng = jax.random.key(cfg.seed)
    rollout_rng, probe_rng = jax.random.fold_in(rng, 7), jax.random.fold_in(rng, 11)

    def fresh():
        params = initial_params(exp, abstract_params, shardings)
        if params is None:
            return init_train_state(lambda k: init_params(exp.model_config, k), optimizer, rng)
        return train_state_from_params(params, optimizer, rng)

    records, domain_ratios, offline_rollouts = offline_pass(exp, records, fresh)
    sampler = make_sampler(cfg, PromptPool.from_records(records), domain_ratios)
    monitor = RewardHealthMonitor(hc, sampler.pool.domains) if hc.every else None
    probe = HealthProbe(exp, hc, probe_records, pad_steps, overrides) if hc.every else None

    with Checkpointer(os.path.join(exp.workdir, "checkpoints"), save_every=r.save_every, keep=cfg.train.keep) as ckpt:
        def set_sampler_state(sampler_state):
            sampler_state = dict(sampler_state)
            health_state = sampler_state.pop("reward_health", None)
            sampler.set_state(sampler_state)
            if monitor is not None and health_state is not None:
                monitor.load_state_dict(health_state)
                sampler.scale_domains(monitor.scale)

        restored = ckpt.restore_latest(abstract_train_state(optimizer, abstract_params, None, rng), set_sampler_state,
                                       fallback=cfg.train.restore_fallback)
        state = fresh() if restored is None else restored[0]
        start = sampler.iteration
        history = read_metrics(os.path.join(exp.workdir, "logs"), start)   # the rows before a resume
        if monitor is not None and not monitor.checks:      # the guard's baseline: the starting policy
            check_health(monitor, probe, sampler, state.params, jax.random.fold_in(probe_rng, start), start, [])
        spent = offline_rollouts + int(sum(h.get("rollouts", 0) for h in history))
        reference = fresh().params if grpo_cfg.kl_coef > 0 else None    # the KL reference: the starting policy
        with MetricsWriter(os.path.join(exp.workdir, "logs"), r.iterations, initial_step=start,
                           description="rl") as writer:
            for it in range(start, r.iterations):
                t0 = time.perf_counter()
                expansion = expansion_entries(sampler)          # the EMAs that size this iteration's rollout
                rollouts = Rollouts(exp, prompts, records, state.params, jax.random.fold_in(rollout_rng, it),
                                    pad_steps=pad_steps, overrides=overrides)
                iteration = sampler.run_iteration(rollouts)
                state, entries, metrics = train_iteration(exp, grpo_cfg, update, state, iteration,
                                                          rollouts.trajectories(), prompts, seq_len, reference,
                                                          domains=[rec["domain"] for rec in records])
                spent += entries["rollouts"]
                expansion["expansion"] = entries["prompts_rolled_out"] / r.batch_size
                row = {"iteration": it + 1, **entries, "rollouts_total": spent, "offline_rollouts": offline_rollouts,
                       **expansion, "rollout_rounds": rollouts.calls,
                       "padded_prompts": rollouts.padded, "verifier_errors": rollouts.verifier_errors,
                       "seconds": time.perf_counter() - t0,
                       **{f"grpo/{k}": v for k, v in metrics.items()},
                       **{f"sampler/{k}": float(v) for k, v in iteration.metrics.items() if np.ndim(v) == 0}}
                history.append(row)
                if monitor is not None and (it + 1) % hc.every == 0:
                    row.update(check_health(monitor, probe, sampler, state.params,
                                            jax.random.fold_in(probe_rng, it + 1), it + 1, history[-hc.every:]))
                writer.write(it + 1, row)
                if (it + 1) % r.save_every == 0 or it + 1 == r.iterations:
                    health = {"reward_health": monitor.state_dict()} if monitor is not None else {}
                    ckpt.save(state, {**sampler.get_state(), **health}, it + 1)
    return {"stage": "rl", "start_step": start, "steps": r.iterations, "state": state, "history": history,
            "reward_health": monitor.state_dict() if monitor is not None else None,
            "first_reward": history[0]["reward"] if history else float("nan"),
            "last_reward": float(np.mean([h["reward"] for h in history[-5:]])) if history else float("nan")}
