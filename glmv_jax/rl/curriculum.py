"""RLCS: curriculum sampling over difficulty tiers with ratio-EMA rollout expansion (docs/rl.md 1.6-1.7), and the
two baselines (uniform sampling, DAPO regenerate-until-full).

    pool = PromptPool.from_records(records)                  # id, domain, offline difficulty in [0, 1]
    rlcs = RLCSCurriculum(pool, CurriculumConfig(batch_size=64, group_size=8, domain_ratios={"math": .6, "ocr": .4}))
    idx = rlcs.propose()                                     # ceil(B * expansion_ema) prompt indices to roll out
    kept, metrics = rlcs.observe(idx, rewards)               # rewards [len(idx), G] -> the B groups to train on
    it = rlcs.run_iteration(rollout_fn)                      # the same, with rollout_fn(indices) -> rewards

Per prompt a running pass-rate estimate starts at 1 - offline difficulty with `prior_weight` pseudo-samples and
takes every group's mean reward in (weight capped at `memory`, so it follows a changing policy); its
difficulty 1 - p puts it in one of `num_tiers` equal-width tiers (0 = very easy). Each iteration, per domain,
every tier gets a weight f(tier's mean p) (shape: `weighting`, favouring p near 1/2) times tier size^size_power,
floored at `min_weight`; prompts are drawn without replacement (Gumbel top-k) within each domain's share of the
rollout (fixed `domain_ratios`). After the rollout r = share of zero-variance groups, expansion = 1 / (1 - r)
(clamped to [1, max_expansion]) feeds an EMA; each domain keeps its share of the B groups with the highest
reward variance (= p closest to 1/2 for binary rewards); with `fill_quota` a domain's quota slots that would
hold zero-variance groups take other domains' best informative groups instead (off by default: the paper mixes
domains in fixed proportions). Deterministic given `seed`: iteration i draws from numpy Generator([seed, i]);
`state_dict()` is JSON-able.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from glmv_jax.rl.grpo import GroupStats, group_stats

WEIGHTINGS = ("informative", "learnability", "gaussian", "uniform")
SELECT_BY = ("variance", "balance")
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


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
    batch_size: int                           # B: groups trained on per iteration
    group_size: int = 8                       # G (the "informative" weighting uses it)
    num_tiers: int = 5
    weighting: str = "informative"            # f(p): 1 - p^G - (1-p)^G | 4p(1-p) | gaussian at target | 1
    sharpness: float = 1.0                    # f ** sharpness
    target: float = 0.5                       # gaussian centre and width
    width: float = 0.2
    min_weight: float = 0.05                  # floor of f, so no tier starves (hard prompts can become mid)
    size_power: float = 1.0                   # tier weight *= tier size ** size_power (1: f per prompt)
    granularity: str = "tier"                 # "tier": f of the tier's mean p; "prompt": f of each prompt's p
    domain_ratios: Mapping[str, float] | None = None   # None: proportional to the pool's domain sizes
    prior_weight: float = 8.0                 # pseudo-samples behind the offline difficulty
    memory: float = 32.0                      # cap on a prompt's estimate weight
    expansion: bool = True                    # ratio-EMA oversampling (False: roll out exactly B)
    ema_decay: float = 0.8
    initial_expansion: float = 1.0
    max_expansion: float = 4.0
    select_by: str = "variance"               # keep highest reward variance | mean closest to 1/2
    fill_quota: bool = False                  # a domain's quota slots its informative groups cannot fill go to
                                              # other domains' best informative groups (off: the paper's fixed
                                              # per-domain mix, docs/rl.md 1.5)
    zero_var_eps: float = 1e-6
    seed: int = 0

    def __post_init__(self):
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"CurriculumConfig: {msg}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.group_size >= 2, f"group_size must be >= 2, got {self.group_size}")
        need(self.num_tiers >= 1, f"num_tiers must be >= 1, got {self.num_tiers}")
        need(self.weighting in WEIGHTINGS, f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        need(self.granularity in ("tier", "prompt"), f"granularity must be 'tier' or 'prompt', got {self.granularity!r}")
        need(self.select_by in SELECT_BY, f"select_by must be one of {SELECT_BY}, got {self.select_by!r}")
        need(0.0 <= self.min_weight <= 1.0, f"min_weight must be in [0, 1], got {self.min_weight}")
        need(self.sharpness > 0 and self.width > 0, "sharpness and width must be > 0")
        need(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        need(1.0 <= self.initial_expansion <= self.max_expansion,
             f"need 1 <= initial_expansion <= max_expansion, got {self.initial_expansion}, {self.max_expansion}")
        need(self.prior_weight > 0 and self.memory >= self.prior_weight,
             f"need 0 < prior_weight <= memory, got {self.prior_weight}, {self.memory}")


def tier_of(difficulty: np.ndarray, num_tiers: int) -> np.ndarray:
    """Difficulty in [0, 1] -> tier 0 (very easy) .. num_tiers - 1 (very hard), equal-width bins."""
    return np.minimum((np.asarray(difficulty) * num_tiers).astype(int), num_tiers - 1)


def weighting_fn(p: np.ndarray, cfg: CurriculumConfig) -> np.ndarray:
    """f(p) in [min_weight, 1] for pass rates p: peaks at informative difficulty."""
    p = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    if cfg.weighting == "informative":       # P(a group of G binary samples is not all-equal), max 1
        f = (1 - p ** cfg.group_size - (1 - p) ** cfg.group_size) / (1 - 2 * 0.5 ** cfg.group_size)
    elif cfg.weighting == "learnability":
        f = 4 * p * (1 - p)
    elif cfg.weighting == "gaussian":
        f = np.exp(-0.5 * ((p - cfg.target) / cfg.width) ** 2)
    else:
        f = np.ones_like(p)
    return np.maximum(f ** cfg.sharpness, cfg.min_weight)


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


def _check_rewards(indices: np.ndarray, rewards: Any, pool_size: int) -> np.ndarray:
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


def _domain_ratios(pool: PromptPool, ratios: Mapping[str, float] | None) -> np.ndarray:
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


def _gumbel_top_k(rng: np.random.Generator, weights: np.ndarray, k: int) -> np.ndarray:
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


class _Sampler:
    """Shared plumbing: pool, per-iteration RNG, metrics."""

    def __init__(self, pool: PromptPool, batch_size: int, seed: int, domain_ratios, num_tiers: int, eps: float):
        if batch_size > len(pool):
            raise ValueError(f"batch_size {batch_size} exceeds the pool's {len(pool)} prompts")
        self.pool, self.batch_size, self.seed = pool, int(batch_size), int(seed)
        self.ratios = _domain_ratios(pool, domain_ratios)
        self.domain_sizes = np.bincount(pool.domain_index, minlength=len(pool.domains))
        self.num_tiers, self.eps, self.iteration = num_tiers, eps, 0

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


class UniformSampler(_Sampler):
    """Baseline: B prompts uniformly at random (by domain ratio when given), every group kept."""

    def __init__(self, pool: PromptPool, batch_size: int, *, seed: int = 0, domain_ratios=None, num_tiers: int = 5,
                 zero_var_eps: float = 1e-6):
        super().__init__(pool, batch_size, seed, domain_ratios, num_tiers, zero_var_eps)

    def propose(self) -> np.ndarray:
        return self._draw_uniform(self.batch_size, self.rng())

    def observe(self, indices, rewards) -> tuple[np.ndarray, dict]:
        indices = np.asarray(indices, int)
        rewards = _check_rewards(indices, rewards, len(self.pool))
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
            r = _check_rewards(batch, rollout_fn(batch), len(self.pool))
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


class RLCSCurriculum(_Sampler):
    """RLCS (see the module docstring). `propose()` depends only on the state, so a restart between propose
    and observe proposes the same prompts again."""

    def __init__(self, pool: PromptPool, cfg: CurriculumConfig):
        super().__init__(pool, cfg.batch_size, cfg.seed, cfg.domain_ratios, cfg.num_tiers, cfg.zero_var_eps)
        self.cfg = cfg
        self.pass_rate = 1.0 - pool.difficulty.astype(np.float64)     # running estimate per prompt
        self.weight = np.full(len(pool), float(cfg.prior_weight))
        self.times_sampled = np.zeros(len(pool), int)
        self.expansion_ema = float(cfg.initial_expansion)

    def difficulty(self) -> np.ndarray:
        """[N] current (offline merged with online) difficulty = 1 - estimated pass rate."""
        return 1.0 - self.pass_rate

    def tiers(self) -> np.ndarray:
        return tier_of(self.difficulty(), self.num_tiers)

    def rollout_size(self) -> int:
        n = math.ceil(round(self.batch_size * self.expansion_ema, 6)) if self.cfg.expansion else self.batch_size
        return min(n, len(self.pool))

    def sampling_weights(self) -> np.ndarray:
        """[N] relative draw weight of every prompt within its domain."""
        cfg, tiers, dom = self.cfg, self.tiers(), self.pool.domain_index
        if cfg.granularity == "prompt":
            return weighting_fn(self.pass_rate, cfg)
        w = np.zeros(len(self.pool))
        for d in range(len(self.pool.domains)):
            for k in range(self.num_tiers):
                members = (dom == d) & (tiers == k)
                n_k = members.sum()
                if n_k:
                    tier_weight = weighting_fn(self.pass_rate[members].mean(), cfg) * n_k ** cfg.size_power
                    w[members] = tier_weight / n_k
        return w

    def tier_probabilities(self) -> np.ndarray:
        """[num_domains, num_tiers]: the share of each domain's draws that goes to each tier."""
        w, tiers = self.sampling_weights(), self.tiers()
        out = np.zeros((len(self.pool.domains), self.num_tiers))
        np.add.at(out, (self.pool.domain_index, tiers), w)
        return out / np.maximum(out.sum(axis=1, keepdims=True), 1e-300)

    def propose(self) -> np.ndarray:
        """ceil(B * expansion_ema) prompt indices (sorted), split over domains by ratio."""
        rng, w = self.rng(), self.sampling_weights()
        picks = []
        for d, count in enumerate(allocate(self.rollout_size(), self.ratios, self.domain_sizes)):
            members = np.flatnonzero(self.pool.domain_index == d)
            picks.append(members[_gumbel_top_k(rng, w[members], count)])
        return np.sort(np.concatenate(picks)).astype(int)

    def select(self, indices: np.ndarray, rewards: np.ndarray) -> np.ndarray:
        """Positions (sorted) of the B groups to train on: per domain its ratio's share, most balanced first;
        with fill_quota the zero-variance ones among them give way to other domains' informative groups."""
        return self._select(np.asarray(indices, int), self.group_stats(rewards))

    def _select(self, indices: np.ndarray, stats: GroupStats) -> np.ndarray:
        mean, zero = stats.mean, stats.zero_variance
        score = stats.std if self.cfg.select_by == "variance" else -np.abs(mean - 0.5)
        tie_break = self.rng(1).permutation(len(indices))
        dom = self.pool.domain_index[indices]
        quota = allocate(self.batch_size, self.ratios, np.bincount(dom, minlength=len(self.pool.domains)))
        kept = []
        for d, q in enumerate(quota):
            pos = np.flatnonzero(dom == d)
            order = np.lexsort((tie_break[pos], -score[pos]))
            kept.append(pos[order[:q]])
        kept = np.concatenate(kept).astype(int)
        if self.cfg.fill_quota:
            kept = self._fill_quota(kept, score, tie_break, zero)
        return np.sort(kept)

    @staticmethod
    def _fill_quota(kept: np.ndarray, score: np.ndarray, tie_break: np.ndarray, zero: np.ndarray) -> np.ndarray:
        """Swap the zero-variance groups among `kept` (a domain's quota its informative groups could not fill)
        for the best informative groups left out (any domain, by score then tie_break); zero-variance groups
        stay only where no informative group is left. Same count as `kept`."""
        left_out = np.setdiff1d(np.flatnonzero(~zero), kept)
        spare = left_out[np.lexsort((tie_break[left_out], -score[left_out]))]
        wasted = kept[zero[kept]]
        wasted = wasted[np.lexsort((tie_break[wasted], -score[wasted]))]
        swap = min(len(spare), len(wasted))
        return np.concatenate([kept[~zero[kept]], spare[:swap], wasted[swap:]])

    def observe(self, indices, rewards) -> tuple[np.ndarray, dict[str, float]]:
        """Record the rollout's outcomes; -> (positions of the kept groups, metrics)."""
        indices = np.asarray(indices, int)
        rewards = _check_rewards(indices, rewards, len(self.pool))
        cfg = self.cfg
        stats = self.group_stats(rewards)
        kept = self._select(indices, stats)
        metrics = iteration_metrics(self.pool, indices, stats, kept, self.tiers(), self.num_tiers)
        kept_per_domain = np.bincount(self.pool.domain_index[indices[kept]], minlength=len(self.pool.domains))
        metrics.update({f"domain/{name}/kept": float(n) for name, n in zip(self.pool.domains, kept_per_domain)})
        mean, zero = stats.mean, stats.zero_variance
        samples = rewards.shape[1]
        for i, m in zip(indices, mean):                       # sequential: a prompt may appear twice
            self.pass_rate[i] = (self.weight[i] * self.pass_rate[i] + samples * m) / (self.weight[i] + samples)
            self.weight[i] = min(self.weight[i] + samples, cfg.memory)
            self.times_sampled[i] += 1
        r = float(zero.mean()) if len(zero) else 0.0
        ratio = min(1.0 / (1.0 - r), cfg.max_expansion) if r < 1.0 else cfg.max_expansion
        if cfg.expansion:
            self.expansion_ema = cfg.ema_decay * self.expansion_ema + (1.0 - cfg.ema_decay) * ratio
        self.iteration += 1
        metrics.update(expansion_ratio=ratio, expansion_ema=self.expansion_ema,
                       next_rollout_prompts=float(self.rollout_size()))
        tiers = self.tiers()
        for k in range(self.num_tiers):
            metrics[f"tier/{k}/size"] = float((tiers == k).sum())
        for d, name in enumerate(self.pool.domains):
            for k, share in enumerate(self.tier_probabilities()[d]):
                metrics[f"domain/{name}/tier_prob/{k}"] = float(share)
        return kept, metrics

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "expansion_ema": self.expansion_ema, "ids_count": len(self.pool),
                "first_id": self.pool.ids[0], "pass_rate": self.pass_rate.tolist(), "weight": self.weight.tolist(),
                "times_sampled": self.times_sampled.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["ids_count"] != len(self.pool) or state["first_id"] != self.pool.ids[0]:
            raise ValueError(f"curriculum state is for a pool of {state['ids_count']} prompts starting at "
                             f"{state['first_id']!r}, not this pool ({len(self.pool)}, {self.pool.ids[0]!r})")
        self.iteration, self.expansion_ema = int(state["iteration"]), float(state["expansion_ema"])
        self.pass_rate = np.asarray(state["pass_rate"], np.float64)
        self.weight = np.asarray(state["weight"], np.float64)
        self.times_sampled = np.asarray(state["times_sampled"], int)


class CurriculumPrompts:
    """Prompt iterator for the RL loop over a random-access dataset (a grain.MapDataset such as
    data.pipeline.prompt_dataset, or a list), ordered like the pool:

        prompts = CurriculumPrompts(rlcs, grain_dataset)
        indices, records = next(prompts)              # records[j] = dataset[indices[j]]
        kept, metrics = rlcs.observe(indices, rewards)
    get_state / set_state checkpoint the sampler (JSON-able)."""

    def __init__(self, sampler: _Sampler, dataset: Any):
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
