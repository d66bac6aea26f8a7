"""Reward health: a guard against one bad reward signal taking over a multi-domain RL run (the paper's Sec. 5.2
and Open Question 3; docs/rl.md "Reward health").

Every `every` iterations the RL stage hands the monitor, per domain, the training reward over the iterations
since the last check (mean and standard error of the per-iteration `reward_rolled/<domain>`: the reward the
run's verifiers paid on what it rolled out) and the per-prompt scores of a small fixed probe set (split
"probe", `probe_samples` responses each at the rollout temperature) scored by the real verifiers. A reward
that the policy earns by hacking its verifier climbs while the probe does not; a healthy one moves both. At
check k, against the first check:

    divergence_k = (train_k - train_1) - (probe_k - probe_1)
    se_k         = sqrt(se(train_k)^2 + se(train_1)^2 + se(paired probe_k - probe_1)^2)

A domain strikes when divergence_k > max(min_gap, z * se_k) and its training reward rose; `patience`
consecutive strikes flag it, once, with a log line naming it; `action` then leaves the curriculum alone
("flag"), scales the domain's share of rollouts and kept groups by `downweight` ("downweight") or removes it
("pause") through Sampler.scale_domains. The monitor's state (checks, strikes, flags, scales) is JSON-able
and checkpointed with the sampler's.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

ACTIONS = ("flag", "downweight", "pause")


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    every: int = 0                  # iterations between checks; 0 = no monitor
    probe_per_domain: int = 16      # fixed probe prompts per domain (split "probe", tiers of the RL pool)
    probe_samples: int = 8          # responses per probe prompt (mean@k: less noise per prompt than greedy)
    min_gap: float = 0.1            # a strike needs the divergence above this ...
    z: float = 2.0                  # ... and above z standard errors
    patience: int = 2               # consecutive strikes that flag a domain
    action: str = "flag"            # flag | downweight | pause
    downweight: float = 0.25        # share multiplier of a flagged domain under "downweight"

    def __post_init__(self):
        if self.every < 0 or self.probe_per_domain < 2 or self.probe_samples < 1 or self.patience < 1:
            raise ValueError(f"rl.health needs every >= 0, probe_per_domain >= 2, probe_samples >= 1 and "
                             f"patience >= 1, got {self}")
        if self.action not in ACTIONS:
            raise ValueError(f"rl.health.action {self.action!r} is not one of {ACTIONS}")
        if not 0.0 <= self.downweight <= 1.0 or self.min_gap < 0 or self.z < 0:
            raise ValueError(f"rl.health needs 0 <= downweight <= 1, min_gap >= 0 and z >= 0, got {self}")


def window_reward(rows: Sequence[Mapping[str, Any]], domain: str) -> tuple[float, float]:
    """(mean, se) over history rows of `reward_rolled/<domain>` (iterations without that domain skipped; se of
    one value: 0; no value: nan)."""
    values = np.asarray([r[f"reward_rolled/{domain}"] for r in rows if f"reward_rolled/{domain}" in r], np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(values.mean()), se


class RewardHealthMonitor:
    """Per-domain divergence of training reward from the strict probe reward (module docstring)."""

    def __init__(self, cfg: HealthConfig, domains: Sequence[str]):
        self.cfg, self.domains = cfg, tuple(domains)
        self.checks: list[dict] = []          # {"iteration", "train": {d: [mean, se]}, "probe": {d: [scores]}}
        self.strikes = {d: 0 for d in self.domains}
        self.flagged: dict[str, int] = {}     # domain -> iteration flagged
        self.scale = {d: 1.0 for d in self.domains}

    def check(self, iteration: int, train: Mapping[str, tuple[float, float]],
              probe: Mapping[str, Sequence[float]]) -> tuple[dict[str, float], list[str]]:
        """Record one check -> (metrics `health/<domain>/...`, the domains newly flagged)."""
        self.checks.append({"iteration": int(iteration), "train": {d: list(map(float, train[d])) for d in self.domains},
                            "probe": {d: [float(x) for x in probe[d]] for d in self.domains}})
        first, metrics, newly = self.checks[0], {}, []
        for d in self.domains:
            (t, t_se), (t0, t0_se) = self.checks[-1]["train"][d], first["train"][d]
            p, p0 = np.asarray(self.checks[-1]["probe"][d]), np.asarray(first["probe"][d])
            probe_rise = float(np.mean(p - p0))
            probe_se = float(np.std(p - p0, ddof=1) / math.sqrt(len(p))) if len(p) > 1 else 0.0
            train_rise = t - t0
            divergence = train_rise - probe_rise
            se = math.sqrt(t_se ** 2 + t0_se ** 2 + probe_se ** 2)
            strike = bool(np.isfinite(divergence) and train_rise > 0
                          and divergence > max(self.cfg.min_gap, self.cfg.z * se))
            self.strikes[d] = self.strikes[d] + 1 if strike else 0
            if self.strikes[d] >= self.cfg.patience and d not in self.flagged:
                self.flagged[d] = int(iteration)
                newly.append(d)
                if self.cfg.action != "flag":
                    self.scale[d] = 0.0 if self.cfg.action == "pause" else self.cfg.downweight
            metrics.update({f"health/{d}/train": t, f"health/{d}/probe": float(p.mean()),
                            f"health/{d}/divergence": divergence, f"health/{d}/divergence_se": se,
                            f"health/{d}/flagged": float(d in self.flagged), f"health/{d}/scale": self.scale[d]})
        return metrics, newly

    def describe(self, domain: str) -> str:
        """The log line of a flagged domain."""
        first, last = self.checks[0], self.checks[-1]
        rise = last["train"][domain][0] - first["train"][domain][0]
        probe = float(np.mean(last["probe"][domain]) - np.mean(first["probe"][domain]))
        what = {"flag": "flagged only (rl.health.action = 'flag')", "pause": "paused in the curriculum",
                "downweight": f"its curriculum share scaled by {self.cfg.downweight}"}[self.cfg.action]
        return (f"reward health: domain {domain!r} training reward {rise:+.3f} since iteration {first['iteration']} "
                f"while its strict probe reward moved {probe:+.3f} ({self.strikes[domain]} checks in a row): {what}")

    def state_dict(self) -> dict:
        return {"checks": self.checks, "strikes": self.strikes, "flagged": self.flagged, "scale": self.scale}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.checks = list(state["checks"])
        self.strikes = {d: int(state["strikes"].get(d, 0)) for d in self.domains}
        self.flagged = {d: int(i) for d, i in state["flagged"].items()}
        self.scale = {d: float(state["scale"].get(d, 1.0)) for d in self.domains}
