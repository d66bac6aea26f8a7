"""RLCS: curriculum sampling over difficulty tiers with ratio-EMA rollout expansion (docs/rl.md section 5); the
baselines (uniform sampling, DAPO regenerate-until-full) are in rl/samplers.py.

    pool = PromptPool.from_records(records)                  # id, domain, offline difficulty in [0, 1]
    rlcs = RLCSCurriculum(pool, CurriculumConfig(batch_size=64, group_size=8, domain_ratios={"math": .6, "ocr": .4}))
    idx = rlcs.propose()                                     # ceil(B * expansion_ema) prompt indices to roll out
    kept, metrics = rlcs.observe(idx, rewards)               # rewards [len(idx), G] -> the B groups to train on
    it = rlcs.run_iteration(rollout_fn)                      # the same, with rollout_fn(indices) -> rewards

Per prompt a running pass-rate estimate starts at 1 - offline difficulty with `prior_weight` pseudo-samples and
takes every group's mean reward in (weight capped at `memory`, so it follows a changing policy); its
difficulty 1 - p puts it in one of `num_tiers` equal-width tiers (0 = very easy). With `pool_tiers` the
rewards also feed the prompt's (domain, offline tier) cell, and prompts not drawn yet take the cell's pooled
rate: a prompt is drawn about once in a short run, so per-prompt estimates alone never correct a wrong
prior. Each iteration, per domain, every tier gets a weight f(tier's mean p) (shape: `weighting`, favouring
p near 1/2) times tier size^size_power, floored at `min_weight`; prompts are drawn without replacement
(Gumbel top-k) within each domain's share of the rollout (`domain_ratios`: fixed, or the stage's pilot mix).
After the rollout r = share of zero-variance groups, expansion = 1 / (1 - r) (clamped to [1, max_expansion])
feeds an EMA, one for the whole rollout or (`domain_expansion`) one per domain sizing that domain's share;
each domain keeps its share of the B groups with the highest reward variance (= p closest to 1/2 for binary
rewards); with `fill_quota` a domain's quota slots that would hold zero-variance groups take other domains'
best informative groups instead. The dataclass defaults are the paper's plain recipe; experiments/configs/rl.py
turns the rest on, with its reasons. Deterministic given `seed`: iteration i draws from numpy
Generator([seed, i]); `state_dict()` is JSON-able.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from glmv_jax.rl.grpo import GroupStats
from glmv_jax.rl.samplers import (
    PromptPool,
    Sampler,
    allocate,
    check_rewards,
    expansion_ratio,
    gumbel_top_k,
    iteration_metrics,
    tier_of,
)

WEIGHTINGS = ("informative", "learnability", "gaussian", "uniform")
SELECT_BY = ("variance", "balance")


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
                                              # per-domain mix, docs/rl.md section 5)
    pool_tiers: bool = False                  # prompts not yet drawn take the pooled online pass rate of their
                                              # (domain, offline tier) cell: with ~one draw per prompt, per-prompt
                                              # estimates alone never correct a wrong offline prior
    domain_expansion: bool = False            # one ratio EMA per domain: a domain's rollout share grows with its
                                              # own zero-variance share (False: one EMA for the whole rollout)
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


class RLCSCurriculum(Sampler):
    """RLCS (see the module docstring). `propose()` depends only on the state, so a restart between propose
    and observe proposes the same prompts again."""

    def __init__(self, pool: PromptPool, cfg: CurriculumConfig):
        super().__init__(pool, cfg.batch_size, cfg.seed, cfg.domain_ratios, cfg.num_tiers, cfg.zero_var_eps)
        self.cfg = cfg
        self.pass_rate = 1.0 - pool.difficulty.astype(np.float64)     # running estimate per prompt
        self.weight = np.full(len(pool), float(cfg.prior_weight))
        self.times_sampled = np.zeros(len(pool), int)
        self.expansion_ema = float(cfg.initial_expansion)
        self.domain_ema = np.full(len(pool.domains), float(cfg.initial_expansion))
        # (domain, offline tier) cells of the pooled estimates: their prior mean, online reward sums and counts
        self.cell = pool.domain_index * cfg.num_tiers + tier_of(pool.difficulty, cfg.num_tiers)
        cells = len(pool.domains) * cfg.num_tiers
        members = np.maximum(np.bincount(self.cell, minlength=cells), 1)
        self.cell_prior = np.bincount(self.cell, weights=self.pass_rate, minlength=cells) / members
        self.cell_sum, self.cell_n = np.zeros(cells), np.zeros(cells)

    def difficulty(self) -> np.ndarray:
        """[N] current (offline merged with online) difficulty = 1 - estimated pass rate."""
        return 1.0 - self.pass_rate

    def tiers(self) -> np.ndarray:
        return tier_of(self.difficulty(), self.num_tiers)

    def rollout_size(self) -> int:
        return int(self.rollout_counts().sum())

    def rollout_counts(self) -> np.ndarray:
        """[num_domains] prompts to roll out per domain: its share of B times its expansion (one EMA for all
        domains, or its own with domain_expansion), never more than the domain holds."""
        if not self.cfg.expansion:
            return allocate(self.batch_size, self.ratios, self.domain_sizes)
        if not self.cfg.domain_expansion:
            n = min(math.ceil(round(self.batch_size * self.expansion_ema, 6)), len(self.pool))
            return allocate(n, self.ratios, self.domain_sizes)
        quota = allocate(self.batch_size, self.ratios, self.domain_sizes)
        want = np.ceil(np.round(quota * self.domain_ema, 6)).astype(int)
        return np.minimum(want, self.domain_sizes)

    def cell_rates(self) -> np.ndarray:
        """[cells] pooled pass rate per (domain, offline tier): the cell's prior mean with prior_weight
        pseudo-samples plus every reward its prompts have taken."""
        w = self.cfg.prior_weight
        return (w * self.cell_prior + self.cell_sum) / (w + self.cell_n)

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
        for d, count in enumerate(self.rollout_counts()):
            members = np.flatnonzero(self.pool.domain_index == d)
            picks.append(members[gumbel_top_k(rng, w[members], count)])
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
        rewards = check_rewards(indices, rewards, len(self.pool))
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
        if cfg.pool_tiers:
            cells = len(self.cell_prior)
            self.cell_sum += np.bincount(self.cell[indices], weights=mean * samples, minlength=cells)
            self.cell_n += np.bincount(self.cell[indices], minlength=cells) * samples
            fresh = self.times_sampled == 0
            self.pass_rate[fresh] = self.cell_rates()[self.cell[fresh]]
        ratio = expansion_ratio(zero, cfg.max_expansion)
        if cfg.expansion:
            self.expansion_ema = cfg.ema_decay * self.expansion_ema + (1.0 - cfg.ema_decay) * ratio
            dom = self.pool.domain_index[indices]
            for d in np.unique(dom):
                ratio_d = expansion_ratio(zero[dom == d], cfg.max_expansion)
                self.domain_ema[d] = cfg.ema_decay * self.domain_ema[d] + (1.0 - cfg.ema_decay) * ratio_d
                metrics[f"domain/{self.pool.domains[d]}/expansion_ema"] = float(self.domain_ema[d])
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
                "times_sampled": self.times_sampled.tolist(), "domain_ema": self.domain_ema.tolist(),
                "cell_sum": self.cell_sum.tolist(), "cell_n": self.cell_n.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["ids_count"] != len(self.pool) or state["first_id"] != self.pool.ids[0]:
            raise ValueError(f"curriculum state is for a pool of {state['ids_count']} prompts starting at "
                             f"{state['first_id']!r}, not this pool ({len(self.pool)}, {self.pool.ids[0]!r})")
        self.iteration, self.expansion_ema = int(state["iteration"]), float(state["expansion_ema"])
        self.pass_rate = np.asarray(state["pass_rate"], np.float64)
        self.weight = np.asarray(state["weight"], np.float64)
        self.times_sampled = np.asarray(state["times_sampled"], int)
        if "domain_ema" in state:         # states written before pooled estimates lack these
            self.domain_ema = np.asarray(state["domain_ema"], np.float64)
            self.cell_sum = np.asarray(state["cell_sum"], np.float64)
            self.cell_n = np.asarray(state["cell_n"], np.float64)
