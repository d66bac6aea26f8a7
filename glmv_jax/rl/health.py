"""Reward health: a guard against one bad reward signal taking over a multi-domain RL run (the paper's Sec. 5.2
and Open Question 3; docs/rl.md "Reward health").

Before the first update (the baseline: the starting policy) and every `every` iterations the stage samples a
small fixed probe set (split "probe", `probe_samples` responses per prompt at the rollout temperature) and scores the same responses twice: with the run's own training
verifiers (t: what the policy is paid) and with the real verifiers (s: what it should be paid). It hands the
monitor, per domain, those per-prompt means and the training reward on the pool since the last check (mean
and standard error of the per-iteration `reward_rolled/<domain>`). A reward the policy earns by hacking its
verifier climbs while the real one does not; a healthy one moves both. At check k, against the baseline
(for "pool", the first check with a pool reward):

    signal "probe" (default):  divergence_k = mean_i [(t_ik - s_ik) - (t_i1 - s_i1)],  se_k = sd_i(...) / sqrt(n)
                               rise_k = mean_i (t_ik - t_i1)
    signal "pool":             divergence_k = (train_k - train_1) - mean_i (s_ik - s_i1)
                               se_k = sqrt(se(train_k)^2 + se(train_1)^2 + se(paired s_k - s_1)^2)
                               rise_k = train_k - train_1

"pool" compares the pool's training reward with the probe directly; it also moves when the curriculum draws
easier prompts or the policy memorises the pool (measured on the demo with real verifiers only: choice +0.18
on the pool, -0.06 on the probe: a false flag), so "probe", which holds prompts and responses fixed and
differs only in the verifier, is the default; both divergences are logged.

A domain strikes when divergence_k > max(min_gap, z * se_k) and rise_k > 0; `patience` consecutive strikes
flag it, once, with a log line naming it; `action` then leaves the curriculum alone
("flag"), scales the domain's share of rollouts and kept groups by `downweight` ("downweight") or removes it
("pause") through Sampler.scale_domains. The monitor's state (checks, strikes, flags; the scales follow from
the flags) is JSON-able and checkpointed with the sampler's.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from glmv_jax.evaluation.stats import mean_se

ACTIONS = ("flag", "downweight", "pause")
SIGNALS = ("probe", "pool")


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    every: int = 0                  # iterations between checks; 0 = no monitor
    probe_per_domain: int = 24      # fixed probe prompts per domain (split "probe", tiers of the RL pool)
    probe_samples: int = 6          # responses per probe prompt (mean@k: less noise per prompt than greedy)
    min_gap: float = 0.05           # a strike needs the divergence above this ...
    z: float = 2.0                  # ... and above z standard errors
    patience: int = 2               # consecutive strikes that flag a domain
    action: str = "flag"            # flag | downweight | pause
    signal: str = "probe"           # probe | pool (module docstring)
    downweight: float = 0.25        # share multiplier of a flagged domain under "downweight"

    def __post_init__(self):
        if self.every < 0 or self.probe_per_domain < 2 or self.probe_samples < 1 or self.patience < 1:
            raise ValueError(f"rl.health needs every >= 0, probe_per_domain >= 2, probe_samples >= 1 and "
                             f"patience >= 1, got {self}")
        if self.signal not in SIGNALS:
            raise ValueError(f"rl.health.signal {self.signal!r} is not one of {SIGNALS}")
        if self.action not in ACTIONS:
            raise ValueError(f"rl.health.action {self.action!r} is not one of {ACTIONS}")
        if not 0.0 <= self.downweight <= 1.0 or self.min_gap < 0 or self.z < 0:
            raise ValueError(f"rl.health needs 0 <= downweight <= 1, min_gap >= 0 and z >= 0, got {self}")


def window_reward(rows: Sequence[Mapping[str, Any]], domain: str) -> tuple[float, float]:
    """(mean, se) over history rows of `reward_rolled/<domain>` (iterations without that domain skipped; se of
    one value: 0; no value: nan)."""
    values = np.asarray([r[f"reward_rolled/{domain}"] for r in rows if f"reward_rolled/{domain}" in r], np.float64)
    values = values[np.isfinite(values)]
    return mean_se(values) if len(values) else (float("nan"), float("nan"))


class RewardHealthMonitor:
    """Per-domain divergence of training reward from the strict probe reward (module docstring)."""

    def __init__(self, cfg: HealthConfig, domains: Sequence[str]):
        self.cfg, self.domains = cfg, tuple(domains)
        self.checks: list[dict] = []          # {"iteration", "train": {d: [mean, se]}, "probe": {d: [scores]}}
        self.strikes = {d: 0 for d in self.domains}
        self.flagged: dict[str, int] = {}     # domain -> iteration flagged

    @property
    def scale(self) -> dict[str, float]:
        """{domain: its curriculum share multiplier}: 1, or for a flagged domain 0 (pause) / downweight."""
        flagged = {"flag": 1.0, "pause": 0.0, "downweight": self.cfg.downweight}[self.cfg.action]
        return {d: flagged if d in self.flagged else 1.0 for d in self.domains}

    def check(self, iteration: int, train: Mapping[str, tuple[float, float]], probe: Mapping[str, Sequence[float]],
              probe_trained: Mapping[str, Sequence[float]] | None = None) -> tuple[dict[str, float], list[str]]:
        """Record one check -> (metrics `health/<domain>/...`, the domains newly flagged). train: {domain: (mean,
        se)} on the pool since the last check; probe / probe_trained: {domain: per-prompt mean reward} of the
        probe responses under the real / the training verifiers (None: the same, no override)."""
        probe_trained = probe if probe_trained is None else probe_trained
        self.checks.append({"iteration": int(iteration), "train": {d: list(map(float, train[d])) for d in self.domains},
                            "probe": {d: [float(x) for x in probe[d]] for d in self.domains},
                            "probe_trained": {d: [float(x) for x in probe_trained[d]] for d in self.domains}})
        metrics, newly = {}, []
        for d in self.domains:
            signals = self.divergences(d)
            divergence, se, rise = signals[self.cfg.signal]
            strike = bool(np.isfinite(divergence) and rise > 0 and divergence > max(self.cfg.min_gap, self.cfg.z * se))
            self.strikes[d] = self.strikes[d] + 1 if strike else 0
            if self.strikes[d] >= self.cfg.patience and d not in self.flagged:
                self.flagged[d] = int(iteration)
                newly.append(d)
            last = self.checks[-1]
            metrics.update({f"health/{d}/train": last["train"][d][0], f"health/{d}/probe": float(np.mean(last["probe"][d])),
                            f"health/{d}/probe_trained": float(np.mean(last["probe_trained"][d])),
                            f"health/{d}/divergence": divergence, f"health/{d}/divergence_se": se,
                            f"health/{d}/pool_divergence": signals["pool"][0],
                            f"health/{d}/probe_divergence": signals["probe"][0],
                            f"health/{d}/flagged": float(d in self.flagged), f"health/{d}/scale": self.scale[d]})
        return metrics, newly

    def divergences(self, domain: str) -> dict[str, tuple[float, float, float]]:
        """{signal: (divergence, se, rise)} of the last check against the first (module docstring)."""
        first, last = self.checks[0], self.checks[-1]
        s, s1 = np.asarray(last["probe"][domain]), np.asarray(first["probe"][domain])
        t, t1 = np.asarray(last["probe_trained"][domain]), np.asarray(first["probe_trained"][domain])
        sd = lambda x: mean_se(x)[1]
        change = (t - s) - (t1 - s1)
        pool_first = next((c for c in self.checks if np.isfinite(c["train"][domain][0])), first)   # not the start
        (pool, pool_se), (pool1, pool1_se) = last["train"][domain], pool_first["train"][domain]
        probe_change = s - np.asarray(pool_first["probe"][domain])
        return {"probe": (float(change.mean()), sd(change), float(np.mean(t - t1))),
                "pool": ((pool - pool1) - float(probe_change.mean()),
                         math.sqrt(pool_se ** 2 + pool1_se ** 2 + sd(probe_change) ** 2), pool - pool1)}

    def describe(self, domain: str) -> str:
        """The log line of a flagged domain."""
        first, last = self.checks[0], self.checks[-1]
        divergence, se, rise = self.divergences(domain)[self.cfg.signal]
        probe = float(np.mean(last["probe"][domain]) - np.mean(first["probe"][domain]))
        where = "on the probe set" if self.cfg.signal == "probe" else "on the pool"
        what = {"flag": "flagged only (rl.health.action = 'flag')", "pause": "paused in the curriculum",
                "downweight": f"its curriculum share scaled by {self.cfg.downweight}"}[self.cfg.action]
        return (f"reward health: domain {domain!r} training reward {rise:+.3f} {where} since iteration "
                f"{first['iteration']} while its real-verifier probe reward moved {probe:+.3f} (divergence "
                f"{divergence:+.3f} +- {se:.3f}, {self.strikes[domain]} checks in a row): {what}")

    def state_dict(self) -> dict:
        return {"checks": self.checks, "strikes": self.strikes, "flagged": self.flagged}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.checks = list(state["checks"])
        self.strikes = {d: int(state["strikes"].get(d, 0)) for d in self.domains}
        self.flagged = {d: int(i) for d, i in state["flagged"].items()}
