"""Standard errors for held-out evaluation (docs/rl.md, "Evaluation").

Per domain d with n_d prompts and per-prompt scores x_i (greedy: the reward of the one greedy answer;
sampled mean@k: the mean reward of the prompt's k samples):

    mean_d = sum_i x_i / n_d,            se_d = sd(x, ddof=1) / sqrt(n_d)

Overall = the unweighted mean over the D domains (every domain counts the same, whatever its prompt count),
with the domains' samples independent:

    mean = sum_d mean_d / D,             se = sqrt(sum_d se_d^2) / D

Paired stage comparison (the same prompts after both stages): per prompt d_i = x_i(later) - x_i(earlier),
delta_d = mean(d), se_d = sd(d, ddof=1) / sqrt(n_d); overall as above over the per-domain deltas.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of independent values; the SE of fewer than 2 values is 0."""
    x = np.asarray(values, np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("mean_se of no values")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
    return float(x.mean()), se


def combine(domain_stats: Mapping[str, tuple[float, float]]) -> tuple[float, float]:
    """(mean, se) over domains from per-domain (mean, se): unweighted mean, se = sqrt(sum se_d^2) / D."""
    if not domain_stats:
        raise ValueError("combine of no domains")
    means = np.array([m for m, _ in domain_stats.values()])
    ses = np.array([s for _, s in domain_stats.values()])
    return float(means.mean()), float(math.sqrt(float((ses ** 2).sum())) / len(ses))


def summarize(prompts: Sequence[Mapping], keys: Sequence[str] = ("greedy", "sampled")) -> dict:
    """Per-prompt rows {"domain", <key>: score, ...} -> {domain: {key, key_se, n}, "mean": {key, key_se}}."""
    by_domain: dict[str, list[Mapping]] = {}
    for row in prompts:
        by_domain.setdefault(row["domain"], []).append(row)
    out: dict = {}
    for domain, rows in sorted(by_domain.items()):
        entry: dict = {"n": len(rows)}
        for key in keys:
            if all(r.get(key) is not None for r in rows):
                entry[key], entry[f"{key}_se"] = mean_se([r[key] for r in rows])
        out[domain] = entry
    overall = {}
    for key in keys:
        per = {d: (e[key], e[f"{key}_se"]) for d, e in out.items() if key in e}
        if per and len(per) == len(out):
            overall[key], overall[f"{key}_se"] = combine(per)
    out["mean"] = overall
    return out


def paired(earlier: Sequence[Mapping], later: Sequence[Mapping], keys: Sequence[str] = ("greedy", "sampled")) -> dict:
    """Paired later-minus-earlier differences over the same prompts (matched by "id"; both stages must hold
    exactly the same prompt ids) -> {key_delta, key_se, "domains": {domain: {key_delta, key_se, n}}}."""
    before = {r["id"]: r for r in earlier}
    after = {r["id"]: r for r in later}
    if set(before) != set(after):
        missing = sorted(set(before) ^ set(after))[:5]
        raise ValueError(f"paired evaluation needs the same prompts in both stages; differing ids e.g. {missing}")
    diffs = [{"domain": after[i]["domain"], "id": i,
              **{k: after[i][k] - before[i][k] for k in keys
                 if after[i].get(k) is not None and before[i].get(k) is not None}} for i in sorted(after)]
    table = summarize(diffs, keys)
    out: dict = {"domains": {}}
    for key in keys:
        if key in table["mean"]:
            out[f"{key}_delta"], out[f"{key}_se"] = table["mean"][key], table["mean"][f"{key}_se"]
    for domain, entry in table.items():
        if domain != "mean":
            out["domains"][domain] = {"n": entry["n"], **{f"{k}_delta": entry[k] for k in keys if k in entry},
                                      **{f"{k}_se": entry[f"{k}_se"] for k in keys if k in entry}}
    return out
