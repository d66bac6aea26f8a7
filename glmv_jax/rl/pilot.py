"""RLCS's offline pass: the starting checkpoint's own pass rates on the prompt pool (docs/rl.md, RLCS), and the
domain mix they suggest ("domain mix by pilot").

    subset = offline_subset(records, per_domain=32)            # the prompts measured (0: the whole pool)
    measured = measure_pool(exp, params_fn, subset, k=4, cache_dir=stage_dir)   # {id: DifficultyRecord}, cached
    difficulty = spread_difficulty(records, measured)          # unmeasured: their (domain, tier) cell's mean
    ratios, notes = pilot_ratios(records, measured, group_size=8)

The measured difficulty (1 - the share of k samples that pass) replaces the task generator's tier label as
the curriculum's prior; prompts the pass did not measure take their (domain, generator tier) cell's measured
mean. A domain's weight in the mix is its share of the pool times its expected share of
informative groups, mean_i [1 - p_i^G - (1 - p_i)^G] over its prompts: a domain the model always fails (or
always solves) yields zero-variance groups only and gets weight 0; the notes say which and why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from glmv_jax.evaluation.evaluate import sample_answers
from glmv_jax.evaluation.stats import mean_se
from glmv_jax.rl.difficulty import DifficultyRecord, measure_difficulty, reward_fn_for


def starting_point(cfg) -> str:
    """What the RL stage starts from, for cache keys: train.init_from's directory with its checkpoint steps,
    or the HF checkpoint, or the seeded initialisation (so a retrained SFT in the same directory is a miss)."""
    init_from = str(cfg.train.get("init_from") or "")
    if init_from:
        ckpt = os.path.join(init_from, "checkpoints")
        steps = sorted(os.listdir(ckpt)) if os.path.isdir(ckpt) else []
        stamp = max((os.path.getmtime(os.path.join(ckpt, s)) for s in steps), default=0.0)
        return f"init_from={os.path.realpath(init_from)} steps={steps} mtime={stamp:.0f}"
    if cfg.model.get("hf_checkpoint"):
        return f"hf={os.path.realpath(str(cfg.model.hf_checkpoint))}"
    return f"seeded init, seed {cfg.seed}"


def offline_subset(records: Sequence[dict], per_domain: int) -> list[dict]:
    """The prompts the offline pass measures: the first `per_domain` of every domain (0: all). The pool's
    records of a domain are independent draws, so the first n are a random sample of it."""
    if per_domain <= 0:
        return list(records)
    seen: dict[str, int] = {}
    out = []
    for rec in records:
        seen[rec["domain"]] = seen.get(rec["domain"], 0) + 1
        if seen[rec["domain"]] <= per_domain:
            out.append(rec)
    return out


def measure_pool(exp, params_fn: Callable[[], Any], records: Sequence[dict], *, k: int,
                 cache_dir: str) -> dict[str, DifficultyRecord]:
    """pass@k difficulty of `records` under the starting params (params_fn(), called only on a cache miss),
    sampled at the RL temperature; read from cache_dir/offline_difficulty.json when that holds the same
    prompts, k, starting point and sampling settings."""
    r = exp.cfg.rl
    seed = exp.cfg.seed + 11
    key = hashlib.sha256(json.dumps(
        [[str(rec["id"]) for rec in records], k, starting_point(exp.cfg), int(r.max_new_tokens),
         float(r.temperature), float(r.top_p), str(r.style), seed]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, "offline_difficulty.json")
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return {row["id"]: DifficultyRecord(**row) for row in cached["records"]}
    params = params_fn()

    def generate_fn(chunk, n):
        return sample_answers(exp, params, chunk, n, max_new_tokens=r.max_new_tokens,
                              batch_size=max(r.batch_size, 1) * r.group_size, temperature=r.temperature,
                              top_p=r.top_p, seed=seed, style=r.style)

    measured = measure_difficulty(list(records), generate_fn, reward_fn_for(r.style), k=k, batch_size=len(records))
    os.makedirs(cache_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"key": key, "records": [dataclasses.asdict(m) for m in measured]}, f)
    return {m.id: m for m in measured}


def spread_difficulty(records: Sequence[dict], measured: Mapping[str, DifficultyRecord]) -> list[float]:
    """Every record's offline difficulty: its own measurement, else the mean measured difficulty of its
    (domain, generator tier) cell, else of its domain, else its own label (0.5 without one)."""
    cells: dict[tuple, list[float]] = {}
    for rec in records:
        m = measured.get(str(rec["id"]))
        if m is not None:
            cells.setdefault((rec["domain"], rec.get("tier")), []).append(m.difficulty)
            cells.setdefault((rec["domain"],), []).append(m.difficulty)
    out = []
    for rec in records:
        m = measured.get(str(rec["id"]))
        pooled = cells.get((rec["domain"], rec.get("tier"))) or cells.get((rec["domain"],))
        label = rec.get("difficulty")
        out.append(m.difficulty if m is not None else float(np.mean(pooled)) if pooled else
                   float(0.5 if label is None else label))
    return out


def pilot_ratios(records: Sequence[dict], measured: Mapping[str, DifficultyRecord], group_size: int,
                 min_informative: float = 0.05, blind: Mapping[str, float] | None = None,
                 min_lead_se: float = 2.0, blind_weight: float = 0.0) -> tuple[dict[str, float] | None, list[str]]:
    """{domain: ratio} of the curriculum's domain mix over the pool `records` and one note per domain (its
    measured pass rate, expected informative share and whether it was kept or dropped). A domain weighs its
    pool size times the expected informative share of its measured prompts (a domain none of whose prompts
    was measured takes the mean share of the others). None (keep the configured mix, with a note saying so)
    when no domain yields informative groups: RL then has nothing to learn from, and the metrics show it.

    `blind` ({record id: reward of the domain's most common answer}, baselines.most_common_rewards): a domain
    whose measured mean reward does not lead that blind prior by more than `min_lead_se` paired standard
    errors is dropped too (`blind_weight` > 0: kept at that fraction of its weight): its informative groups are
    lucky guesses, and RL on them only moves the answer prior (greedy answers of near-ties flip together;
    measured on the demo in docs/rl.md)."""
    sizes: dict[str, int] = {}
    rates: dict[str, list[float]] = {}
    for rec in records:
        sizes[rec["domain"]] = sizes.get(rec["domain"], 0) + 1
        m = measured.get(str(rec["id"]))
        if m is not None:
            rates.setdefault(rec["domain"], []).append(m.pass_rate)
    shares = {d: float(np.mean(1.0 - np.asarray(p) ** group_size - (1.0 - np.asarray(p)) ** group_size))
              for d, p in rates.items()}
    ratios, notes = {}, []
    for domain in sorted(sizes):
        if domain not in shares:
            share = float(np.mean(list(shares.values()))) if shares else 1.0
            ratios[domain] = sizes[domain] * share
            notes.append(f"{domain}: not measured -> kept at the measured domains' mean informative share {share:.2f}")
            continue
        p, informative = float(np.mean(rates[domain])), shares[domain]
        keep = informative >= min_informative
        verdict = "kept" if keep else ("dropped: all-wrong" if p < 0.5 else "dropped: all-right")
        lead_text, scale = "", 1.0
        if keep and blind is not None:
            lead, se = blind_lead(domain, measured, blind)
            lead_text = f", mean reward over its most common answer's {lead:+.2f} +- {se:.2f}"
            if lead <= min_lead_se * se:
                keep, scale = blind_weight > 0, blind_weight
                verdict = (f"weight x {blind_weight:g}" if keep else "dropped") + \
                    f": not {min_lead_se:g} SE above answering the prior"
        ratios[domain] = sizes[domain] * informative * scale if keep else 0.0
        notes.append(f"{domain}: pass rate {p:.2f} over {len(rates[domain])} prompts, expected informative "
                     f"groups {informative:.2f}{lead_text} -> {verdict}")
    if not any(ratios.values()):
        return None, notes + ["no domain yields informative groups at the starting checkpoint: "
                              "keeping the configured domain mix"]
    total = sum(ratios.values())
    return {d: v / total for d, v in ratios.items()}, notes


def blind_lead(domain: str, measured: Mapping[str, DifficultyRecord],
               blind: Mapping[str, float]) -> tuple[float, float]:
    """(mean, SE) over the domain's measured prompts of their sampled mean reward minus the blind prior's
    reward on the same prompt (paired)."""
    leads = [m.mean_reward - blind[i] for i, m in measured.items() if m.domain == domain and i in blind]
    if not leads:
        raise ValueError(f"pilot: no blind-prior reward for any measured {domain} prompt")
    return mean_se(leads)
