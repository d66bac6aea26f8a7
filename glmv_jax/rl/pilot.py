"""RLCS's offline pass: the starting checkpoint's own pass rates on the prompt pool (docs/rl.md, RLCS), and the
domain mix they suggest ("domain mix by pilot").

    measured = measure_pool(exp, params, records, k=4)        # {id: DifficultyRecord}, cached in the stage dir
    ratios, notes = pilot_ratios(records, measured, group_size=8)

The measured difficulty (1 - the share of k samples that pass) replaces the task generator's tier label as
the curriculum's prior. A domain's weight in the mix is its share of the pool times its expected share of
informative groups, mean_i [1 - p_i^G - (1 - p_i)^G] over its prompts: a domain the model always fails (or
always solves) yields zero-variance groups only and gets weight 0; the notes say which and why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Mapping, Sequence

import numpy as np

from glmv_jax.evaluation.evaluate import sample_answers
from glmv_jax.rewards import compute_rewards
from glmv_jax.rl.difficulty import DifficultyRecord, measure_difficulty


def _cache_key(records: Sequence[dict], k: int, init_from: str, max_new_tokens: int) -> str:
    ids = json.dumps([str(r["id"]) for r in records] + [k, init_from, max_new_tokens])
    return hashlib.sha256(ids.encode()).hexdigest()[:16]


def measure_pool(exp, params, records: Sequence[dict], *, k: int, cache_dir: str) -> dict[str, DifficultyRecord]:
    """pass@k difficulty of every pool prompt under `params` (sampled at the RL temperature), read from
    cache_dir/offline_difficulty.json when it holds the same pool, k, starting point and budget."""
    r = exp.cfg.rl
    key = _cache_key(records, k, str(exp.cfg.train.get("init_from") or exp.cfg.model.get("hf_checkpoint") or ""),
                     int(r.max_new_tokens))
    path = os.path.join(cache_dir, "offline_difficulty.json")
    if os.path.exists(path):
        cached = json.load(open(path))
        if cached.get("key") == key:
            return {row["id"]: DifficultyRecord(**row) for row in cached["records"]}

    def generate_fn(chunk, n):
        return sample_answers(exp, params, chunk, n, max_new_tokens=r.max_new_tokens,
                              batch_size=max(r.batch_size, 1) * r.group_size, temperature=r.temperature,
                              top_p=r.top_p, seed=exp.cfg.seed + 11, style=r.style)

    def reward_fn(record, responses):
        return [x.reward for x in compute_rewards(record["domain"], responses, record["answer"], style=r.style)]

    measured = measure_difficulty(list(records), generate_fn, reward_fn, k=k, batch_size=len(records))
    os.makedirs(cache_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"key": key, "records": [dataclasses.asdict(m) for m in measured]}, f)
    return {m.id: m for m in measured}


def pilot_ratios(records: Sequence[dict], measured: Mapping[str, DifficultyRecord], group_size: int,
                 min_informative: float = 0.05) -> tuple[dict[str, float] | None, list[str]]:
    """{domain: ratio} of the curriculum's domain mix and one note per domain (its pass rate, expected
    informative share and whether it was kept, down-weighted or dropped). None (keep the configured mix,
    with a note saying so) when no domain yields informative groups: RL then has nothing to learn from, and
    the stage's metrics will show it."""
    by_domain: dict[str, list[float]] = {}
    for rec in records:
        by_domain.setdefault(rec["domain"], []).append(measured[str(rec["id"])].pass_rate)
    ratios, notes = {}, []
    for domain, rates in sorted(by_domain.items()):
        p = np.asarray(rates)
        informative = float(np.mean(1.0 - p ** group_size - (1.0 - p) ** group_size))
        keep = informative >= min_informative
        ratios[domain] = len(p) * informative if keep else 0.0
        verdict = "kept" if keep else ("dropped: all-wrong" if p.mean() < 0.5 else "dropped: all-right")
        notes.append(f"{domain}: pass rate {p.mean():.2f}, expected informative groups {informative:.2f} -> {verdict}")
    if not any(ratios.values()):
        return None, notes + ["no domain yields informative groups at the starting checkpoint: "
                              "keeping the configured domain mix"]
    total = sum(ratios.values())
    return {d: v / total for d, v in ratios.items()}, notes
