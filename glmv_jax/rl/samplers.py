"""What every RL prompt sampler shares (the pool, per-iteration draws, iteration metrics) and the two
baselines beside RLCS (rl/curriculum.py): uniform sampling and DAPO's regenerate-until-full; docs/rl.md.

    pool = PromptPool.from_records(records)              # id, domain, offline difficulty in [0, 1]
    it = UniformSampler(pool, batch_size=64).run_iteration(rollout_fn)    # rollout_fn(indices) -> rewards [n, G]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from glmv_jax.rl.grpo import GroupStats, group_stats

RolloutFn = Callable[[np.ndarray], Any]   # prompt indices [n] -> rewards [n, G]


@dataclasses.dataclass(frozen=True)
class PromptPool:
    """The prompts the curriculum draws from: parallel arrays, index i = record i of the prompt dataset."""
    ids: tuple[str, ...]
    domains: tuple[str, ...]          # sorted domain names
    domain_index: np.ndarray          # [N] int, into `domains`
    difficulty: np.ndarray            # [N] float in [0, 1] (offline)

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]], difficulties: Mapping[str, float] | None = None,
                     default_difficulty: float = 0.5) -> "PromptPool":
        """records with "id", "domain" and optionally "difficulty"; `difficulties` (id -> value, e.g. from
        difficulty.read_jsonl) overrides; records without any get `default_difficulty`."""
        if not records:
            raise ValueError("the prompt pool is empty")
        ids, domains, diff = [], [], []
        for i, rec in enumerate(records):
            for key in ("id", "domain"):
                if rec.get(key) is None:
                    raise ValueError(f"prompt record {i} has no {key!r}")
            ids.append(str(rec["id"]))
            domains.append(str(rec["domain"]))
            value = (difficulties or {}).get(ids[-1], rec.get("difficulty"))
            diff.append(default_difficulty if value is None else float(value))
        dupes = sorted({x for x in ids if ids.count(x) > 1}) if len(set(ids)) != len(ids) else []
        if dupes:
            raise ValueError(f"duplicate prompt ids: {dupes[:5]}")
        diff = np.asarray(diff, np.float64)
        bad = np.flatnonzero(~((diff >= 0) & (diff <= 1)))
        if bad.size:
            raise ValueError(f"difficulty must be in [0, 1]; prompt {ids[bad[0]]!r} has {diff[bad[0]]}")
        names = tuple(sorted(set(domains)))
        return cls(tuple(ids), names, np.asarray([names.index(d) for d in domains]), diff)

    def __len__(self) -> int:
        return len(self.ids)


def tier_of(difficulty: np.ndarray, num_tiers: int) -> np.ndarray:
    """Difficulty in [0, 1] -> tier 0 (very easy) .. num_tiers - 1 (very hard), equal-width bins."""
    return np.minimum((np.asarray(difficulty) * num_tiers).astype(int), num_tiers - 1)


def allocate(total: int, ratios: np.ndarray, capacity: np.ndarray | None = None) -> np.ndarray:
    """Split `total` into integer counts by `ratios` (largest remainder; ties to the lower index), never above
    `capacity`; what a full bucket cannot take goes to the others by ratio."""
    ratios = np.asarray(ratios, np.float64)
    cap = np.full(len(ratios), total) if capacity is None else np.asarray(capacity)
    counts = np.zeros(len(ratios), int)
    while counts.sum() < min(total, cap.sum()):
        open_ = (counts < cap) & (ratios > 0)
        if not open_.any():
            open_ = counts < cap
        share = np.where(open_, ratios if (ratios[open_] > 0).any() else 1.0, 0.0)
        want = (total - counts.sum()) * share / share.sum()
        add = np.minimum(np.floor(want).astype(int), cap - counts)
        rest = total - counts.sum() - add.sum()
        order = np.lexsort((np.arange(len(ratios)), -(want - np.floor(want))))
        for j in order:
            if rest <= 0:
                break
            if open_[j] and counts[j] + add[j] < cap[j]:
                add[j] += 1
                rest -= 1
        if add.sum() == 0:
            break
        counts += add
    return counts


def check_rewards(indices: np.ndarray, rewards: Any, pool_size: int) -> np.ndarray:
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 2 or rewards.shape[0] != len(indices):
        raise ValueError(f"rewards must be [num_prompts={len(indices)}, G], got shape {rewards.shape}")
    if not np.all(np.isfinite(rewards)):
        raise ValueError("rewards must be finite (replace -inf format failures before the curriculum)")
    if len(indices) and (indices.min() < 0 or indices.max() >= pool_size):
        raise ValueError(f"prompt indices must be in [0, {pool_size}), got {indices.min()}..{indices.max()}")
    return rewards


def iteration_metrics(pool: PromptPool, indices: np.ndarray, stats: GroupStats, kept: np.ndarray,
                      tiers: np.ndarray, num_tiers: int) -> dict[str, float]:
    """Per tier and per domain: count sampled, mean reward, zero-variance share (per domain also its
    1 / (1 - share)); totals over the rollout and the kept groups. stats: of the rollout's rewards."""
    mean, zero = stats.mean, stats.zero_variance
    out = {"rollout_prompts": float(len(indices)), "kept_groups": float(len(kept)),
           "zero_var_share": float(zero.mean()) if len(zero) else 0.0,
           "kept_informative_share": float((~zero[kept]).mean()) if len(kept) else 0.0,
           "mean_reward": float(mean.mean()) if len(mean) else 0.0}
    groups = [("tier", t, tiers[indices] == t) for t in range(num_tiers)]
    groups += [("domain", d, pool.domain_index[indices] == j) for j, d in enumerate(pool.domains)]
    for kind, name, sel in groups:
        out[f"{kind}/{name}/count"] = float(sel.sum())
        out[f"{kind}/{name}/mean_reward"] = float(mean[sel].mean()) if sel.any() else float("nan")
        out[f"{kind}/{name}/zero_var_share"] = float(zero[sel].mean()) if sel.any() else float("nan")
        if kind == "domain":                                  # 1 / (1 - r) of this domain alone
            informative = int(sel.sum() - zero[sel].sum())
            out[f"domain/{name}/expansion_ratio"] = sel.sum() / informative if informative else float("nan")
    return out


def resolve_domain_ratios(pool: PromptPool, ratios: Mapping[str, float] | None) -> np.ndarray:
    if ratios is None:
        return np.bincount(pool.domain_index, minlength=len(pool.domains)) / len(pool)
    unknown = sorted(set(ratios) - set(pool.domains))
    missing = sorted(set(pool.domains) - set(ratios))
    if unknown or missing:
        raise ValueError(f"domain_ratios must name exactly the pool's domains {list(pool.domains)}: "
                         f"unknown {unknown}, missing {missing}")
    out = np.asarray([float(ratios[d]) for d in pool.domains])
    if np.any(out < 0) or out.sum() <= 0 or not np.all(np.isfinite(out)):
        raise ValueError(f"domain_ratios must be finite, >= 0 and not all zero, got {dict(ratios)}")
    return out / out.sum()


def expansion_ratio(zero_variance: np.ndarray, max_expansion: float) -> float:
    """1 / (1 - r) for a rollout whose share r of groups had zero reward variance, at most max_expansion."""
    r = float(np.mean(zero_variance)) if len(zero_variance) else 0.0
    return min(1.0 / (1.0 - r), max_expansion) if r < 1.0 else max_expansion


def gumbel_top_k(rng: np.random.Generator, weights: np.ndarray, k: int) -> np.ndarray:
    """k indices drawn without replacement with probability proportional to weights (> 0)."""
    with np.errstate(divide="ignore"):                      # weight 0 -> key -inf: drawn only when nothing is left
        keys = np.log(weights) + rng.gumbel(size=len(weights))
    return np.argsort(-keys, kind="stable")[:k]


@dataclasses.dataclass
class Iteration:
    indices: np.ndarray        # [n] prompts rolled out
    rewards: np.ndarray        # [n, G]
    kept: np.ndarray           # positions into indices of the groups to train on
    metrics: dict[str, float]


class Sampler:
    """Shared plumbing: pool, per-iteration RNG, metrics."""

    def __init__(self, pool: PromptPool, batch_size: int, seed: int, domain_ratios, num_tiers: int, eps: float):
        if batch_size > len(pool):
            raise ValueError(f"batch_size {batch_size} exceeds the pool's {len(pool)} prompts")
        self.pool, self.batch_size, self.seed = pool, int(batch_size), int(seed)
        self.base_ratios = resolve_domain_ratios(pool, domain_ratios)
        self.ratios = self.base_ratios.copy()
        self.domain_scale = np.ones(len(pool.domains))
        self.domain_sizes = np.bincount(pool.domain_index, minlength=len(pool.domains))
        self.num_tiers, self.eps, self.iteration = num_tiers, eps, 0

    def scale_domains(self, scale: Mapping[str, float]) -> None:
        """Multiply the named domains' shares of the rollout and of the kept groups by scale[d] (0 pauses a
        domain: it is neither rolled out nor trained on while another domain has prompts); the reward-health
        guard (rl/health.py) calls it. Not part of state_dict: the guard keeps and re-applies its own."""
        for name, factor in scale.items():
            if name not in self.pool.domains or not np.isfinite(factor) or factor < 0:
                raise ValueError(f"scale_domains: need a pool domain and a finite factor >= 0, got {name!r}: {factor}")
            self.domain_scale[self.pool.domains.index(name)] = float(factor)
        ratios = self.base_ratios * self.domain_scale
        self.ratios = ratios / ratios.sum() if ratios.sum() > 0 else self.base_ratios.copy()

    def group_stats(self, rewards: np.ndarray) -> GroupStats:
        """grpo.group_stats with this sampler's zero_var_eps (std: the population std)."""
        return group_stats(rewards, std_ddof=0, zero_var_eps=self.eps)

    def rng(self, *salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.iteration, *salt])

    def tiers(self) -> np.ndarray:
        return tier_of(self.pool.difficulty, self.num_tiers)

    def _draw_uniform(self, n: int, rng: np.random.Generator, exclude: np.ndarray | None = None) -> np.ndarray:
        """n prompts, domain counts by ratio, uniform within each domain, without replacement."""
        free = np.ones(len(self.pool), bool)
        if exclude is not None:
            free[exclude] = False
        cap = np.bincount(self.pool.domain_index[free], minlength=len(self.pool.domains))
        picks = []
        for d, count in enumerate(allocate(n, self.ratios, cap)):
            members = np.flatnonzero(free & (self.pool.domain_index == d))
            picks.append(rng.choice(members, size=count, replace=False))
        return np.sort(np.concatenate(picks)).astype(int)

    def run_iteration(self, rollout_fn: RolloutFn) -> Iteration:
        indices = self.propose()
        rewards = np.asarray(rollout_fn(indices))
        kept, metrics = self.observe(indices, rewards)
        return Iteration(indices, rewards, kept, metrics)

    def get_state(self) -> dict:
        return self.state_dict()

    def set_state(self, state: dict) -> None:
        self.load_state_dict(state)

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.iteration = int(state["iteration"])


class UniformSampler(Sampler):
    """Baseline: B prompts uniformly at random (by domain ratio when given), every group kept."""

    def __init__(self, pool: PromptPool, batch_size: int, *, seed: int = 0, domain_ratios=None, num_tiers: int = 5,
                 zero_var_eps: float = 1e-6):
        super().__init__(pool, batch_size, seed, domain_ratios, num_tiers, zero_var_eps)

    def propose(self) -> np.ndarray:
        return self._draw_uniform(self.batch_size, self.rng())

    def observe(self, indices, rewards) -> tuple[np.ndarray, dict]:
        indices = np.asarray(indices, int)
        rewards = check_rewards(indices, rewards, len(self.pool))
        kept = np.arange(len(indices))
        metrics = iteration_metrics(self.pool, indices, self.group_stats(rewards), kept, self.tiers(), self.num_tiers)
        self.iteration += 1
        return kept, metrics


class DAPOSampler(UniformSampler):
    """Baseline: DAPO dynamic sampling. Roll out uniform batches of `gen_batch_size` prompts (no prompt twice in
    one iteration), drop zero-variance groups, until `batch_size` informative groups or `max_rounds` rounds."""

    def __init__(self, pool: PromptPool, batch_size: int, *, gen_batch_size: int | None = None, max_rounds: int = 10,
                 seed: int = 0, domain_ratios=None, num_tiers: int = 5, zero_var_eps: float = 1e-6):
        super().__init__(pool, batch_size, seed=seed, domain_ratios=domain_ratios, num_tiers=num_tiers,
                         zero_var_eps=zero_var_eps)
        self.gen_batch_size = int(gen_batch_size or batch_size)
        if self.gen_batch_size < 1 or max_rounds < 1:
            raise ValueError(f"gen_batch_size and max_rounds must be >= 1, got {gen_batch_size}, {max_rounds}")
        self.max_rounds = int(max_rounds)

    def run_iteration(self, rollout_fn: RolloutFn) -> Iteration:
        indices = np.zeros(0, int)
        rewards, informative, rounds = [], [], 0
        while len(informative) < self.batch_size and rounds < self.max_rounds and len(indices) < len(self.pool):
            batch = self._draw_uniform(min(self.gen_batch_size, len(self.pool) - len(indices)), self.rng(rounds),
                                       exclude=indices)
            r = check_rewards(batch, rollout_fn(batch), len(self.pool))
            zero = self.group_stats(r).zero_variance
            informative.extend(len(indices) + np.flatnonzero(~zero))
            indices = np.concatenate([indices, batch])
            rewards.append(r)
            rounds += 1
        rewards = np.concatenate(rewards)
        kept = np.asarray(informative[:self.batch_size], int)
        metrics = iteration_metrics(self.pool, indices, self.group_stats(rewards), kept, self.tiers(), self.num_tiers)
        metrics["generation_rounds"] = float(rounds)
        self.iteration += 1
        return Iteration(indices, rewards, kept, metrics)


class CurriculumPrompts:
    """Prompt iterator for the RL loop over a random-access dataset (a grain.MapDataset such as
    data.pipeline.prompt_dataset, or a list), ordered like the pool:

        prompts = CurriculumPrompts(rlcs, grain_dataset)
        indices, records = next(prompts)              # records[j] = dataset[indices[j]]
        kept, metrics = rlcs.observe(indices, rewards)
    get_state / set_state checkpoint the sampler (JSON-able)."""

    def __init__(self, sampler: Sampler, dataset: Any):
        if len(dataset) != len(sampler.pool):
            raise ValueError(f"dataset has {len(dataset)} prompts, the curriculum's pool {len(sampler.pool)}")
        self.sampler, self.dataset = sampler, dataset

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, list]:
        indices = self.sampler.propose()
        return indices, [self.dataset[int(i)] for i in indices]

    def get_state(self) -> dict:
        return self.sampler.get_state()

    def set_state(self, state: dict) -> None:
        self.sampler.set_state(state)
