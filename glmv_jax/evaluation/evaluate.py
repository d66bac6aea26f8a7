"""Held-out evaluation: greedy answers to prompts of the built-in suite (or a JSONL prompt set), scored by
the domain verifiers. Accuracy = mean reward per domain (and per tier).

    result = evaluate(exp, params)      # {"accuracy": {domain: a}, "by_tier": {domain: {tier: a}}, ...}
    texts = sample_answers(exp, params, records, n=8, max_new_tokens=256, batch_size=32, temperature=1.0)
    table = pass_at_k_table(records, rewards, k=4)   # rewards [prompts, n]: unbiased pass@k per domain / tier
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Sequence

import jax
import numpy as np

from glmv_jax.batch import bucket, frame_lengths, frame_rows, longest_frame, patch_segments
from glmv_jax.data.pipeline import _tiers, image_checks
from glmv_jax.data.records import decode_raw
from glmv_jax.data.sources import JsonlSource, manifest_list
from glmv_jax.data import synthetic
from glmv_jax.evaluation import stats
from glmv_jax.evaluation.baselines import baselines
from glmv_jax.generate.prompts import batch_prompts, prompt_dicts
from glmv_jax.generate.sampler import answer_ids, generate, response_text
from glmv_jax.rewards import compute_reward
from glmv_jax.train.experiment import initial_params, param_shardings


def prompt_records(cfg, split: str, per_domain: int, seed: int, tiers: Any = None) -> list[dict]:
    """RL/eval prompt records: the synthetic suite by domain, or the configured JSONL manifests."""
    if cfg.data.source == "synthetic":
        tiers = _tiers(tiers)
        records = []
        for domain in cfg.data.domains:
            records += synthetic.generate(domain, per_domain, seed=seed, split=split, kind="rl", tiers=tiers,
                                image_size=cfg.data.image_size)
        return records
    return [record for manifest in manifest_list(cfg.data.manifests) for record in read_manifest(manifest)]


def read_manifest(path: str, required: Sequence[str] = ()) -> list[dict]:
    """The prompt records of a JSONL manifest, each with base_dir (the manifest's directory: image paths are
    relative to it) and _where ("name.jsonl:line", for error messages); a line that is not UTF-8 JSON, or a
    record without one of the `required` keys, raises."""
    source = JsonlSource(path)
    records = []
    for i in range(len(source)):
        element = source[i]
        record = decode_raw(element["raw"], element["where"])
        for key in required:
            if key not in record:
                raise ValueError(f"{element['where']}: prompt record has no {key!r}")
        records.append({**record, "base_dir": source.base_dir, "_where": element["where"]})
    return records


def longest_gold_response(cfg, tokenizer, split: str, per_domain: int, seed: int, tiers: Any = None) -> dict[str, int]:
    """{domain: tokens of the longest gold response (the suite's own think trace and boxed answer, as SFT
    teaches it, plus the turn-ending stop token)} over the synthetic prompts prompt_records gives."""
    longest: dict[str, int] = {}
    for domain in cfg.data.domains:
        for rec in synthetic.generate(domain, per_domain, seed=seed, split=split, kind="sft", tiers=_tiers(tiers),
                                      image_size=cfg.data.image_size):
            n = len(tokenizer.encode(rec["messages"][-1]["content"])) + 1
            longest[domain] = max(longest.get(domain, 0), n)
    return longest


def check_answer_budget(cfg, tokenizer, split: str, per_domain: int, seed: int, tiers: Any, max_new_tokens: int,
                        where: str) -> None:
    """Raise when `max_new_tokens` cannot hold some domain's longest gold response: such prompts would be
    cut before their answer ends and score 0 whatever the model knows. Synthetic suite only (a no-op else)."""
    if cfg.data.source != "synthetic":
        return
    longest = longest_gold_response(cfg, tokenizer, split, per_domain, seed, tiers)
    short = {d: n for d, n in longest.items() if n > max_new_tokens}
    if short:
        detail = ", ".join(f"{d} needs {n}" for d, n in sorted(short.items()))
        raise ValueError(f"{where}.max_new_tokens = {max_new_tokens} is shorter than the longest gold response "
                         f"(tokens incl. its stop token) of the {split!r} prompts: {detail}")


def generate_answers(exp, params, records: Sequence[dict], *, max_new_tokens: int, batch_size: int,
                     temperature: float = 0.0, seed: int = 0, style: str = "glm41v",
                     checks: dict | None = None) -> list[str]:
    """One response text per record (greedy when temperature is 0), generated batch_size prompts at a time
    through sample_answers (n=1): every batch of the evaluation has one shape, so it compiles once."""
    return [group[0] for group in sample_answers(exp, params, records, 1, max_new_tokens=max_new_tokens,
                                                 batch_size=batch_size, temperature=temperature, seed=seed,
                                                 style=style, checks=checks)]


def _chunks(prompts: Sequence[dict], size: int) -> list[list[dict]]:
    """Consecutive chunks of `size` prompts, the last one padded by repeating its last prompt."""
    chunks = [list(prompts[i:i + size]) for i in range(0, len(prompts), size)]
    return [c + [c[-1]] * (size - len(c)) for c in chunks]


def batch_shape(prompts: Sequence[dict], batch_size: int, per_call: int, merge_area: int, pad_id: int) -> dict:
    """prompts.batch_prompts arguments that give every call of an evaluation (per_call prompts each) the same
    shapes: prompt length of the longest prompt, patch rows of batch_size of the largest images, ViT frame
    rows of the fullest chunk at per_call and at batch_size prompts per call (so greedy, n=1, and sampled,
    n | batch_size, passes over the same records share one compiled loop)."""
    most_patches = max(0 if p.get("pixel_values") is None else len(p["pixel_values"]) for p in prompts)
    frame_len = bucket(max(longest_frame(prompts), 1), 256)
    rows = [frame_rows(frame_lengths(patch_segments(c)), frame_len)
            for size in {per_call, batch_size} for c in _chunks(prompts, size)]
    return dict(min_length=max(len(p["input_ids"]) for p in prompts), min_patches=max(64, batch_size * most_patches),
                frame_len=frame_len, frames=bucket(max(rows + [1]), 1), merge_area=merge_area, pad_id=pad_id)


def sample_answers(exp, params, records: Sequence[dict], n: int, *, max_new_tokens: int, batch_size: int,
                   temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, style: str = "glm41v",
                   checks: dict | None = None) -> list[list[str]]:
    """n response texts per record ([[str] * n] per record; n=1 with temperature 0 is greedy decoding).
    checks: the prompts' file checks (pipeline.image_checks), default ones when None.

    Each generate call holds max(1, batch_size // n) prompts (each image encoded once for its n rows), and
    every call of an evaluation is padded to one shape (batch_shape), so the evaluation compiles once."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"samples per prompt and batch_size must be >= 1, got {n}, {batch_size}")
    if not records:
        raise ValueError("no records to answer")
    force, extra_stops = answer_ids(exp.tokenizer, style)
    stops = tuple(exp.tokenizer.stop_ids) + tuple(extra_stops)
    prompts = prompt_dicts(records, exp.tokenizer, exp.processor, **(checks or {}))
    per_call = max(1, batch_size // n)
    shape = batch_shape(prompts, batch_size, per_call, exp.model_config.vision.spatial_merge_size ** 2,
                        exp.tokenizer.pad_id)
    groups = []
    for c, chunk in enumerate(_chunks(prompts, per_call)):
        batch = batch_prompts(chunk, n, **shape)
        out = generate(exp.model_config, params, batch, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, stop_ids=stops, rng=jax.random.key(seed + c * per_call), force_answer_ids=force,
                       pad_id=exp.tokenizer.pad_id)
        texts = [response_text(exp.tokenizer, out["tokens"][r], out["lengths"][r]) for r in range(len(out["lengths"]))]
        groups += [texts[i * n:(i + 1) * n] for i in range(len(chunk))]
    return groups[:len(prompts)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n - c, k) / C(n, k) (Chen et al. 2021),
    as the stable product 1 - prod_{i = n - c + 1}^{n} (1 - k / i)."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_table(records: Sequence[dict], rewards: Any, k: int, threshold: float = 0.75) -> dict[str, Any]:
    """rewards [prompts, n] of n samples per record; a sample passes when its reward > threshold (docs/rl.md section 7:
    GLM-V's pass@k logging). -> {"pass_at_k": {domain: mean over prompts}, "by_tier": {domain: {tier: ...}},
    "sample_reward": {domain: mean reward of all samples}, "sample_reward_by_tier": {domain: {tier: ...}}}."""
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 2 or rewards.shape[0] != len(records):
        raise ValueError(f"rewards must be [len(records)={len(records)}, n], got shape {rewards.shape}")
    per_prompt = [pass_at_k(rewards.shape[1], int((row > threshold).sum()), k) for row in rewards]
    by_domain, sample = defaultdict(list), defaultdict(list)
    by_tier, sample_tier = defaultdict(lambda: defaultdict(list)), defaultdict(lambda: defaultdict(list))
    for rec, value, row in zip(records, per_prompt, rewards):
        domain, tier = rec["domain"], str(rec.get("tier", "all"))
        by_domain[domain].append(value)
        by_tier[domain][tier].append(value)
        sample[domain].extend(row.tolist())
        sample_tier[domain][tier].extend(row.tolist())
    means = lambda groups: {d: float(np.mean(v)) for d, v in sorted(groups.items())}
    return {"pass_at_k": means(by_domain), "by_tier": {d: means(ts) for d, ts in sorted(by_tier.items())},
            "sample_reward": means(sample), "sample_reward_by_tier": {d: means(ts) for d, ts in sorted(sample_tier.items())}}


def prompt_rewards(records: Sequence[dict], texts: Sequence[str], style: str) -> tuple[list[float], list[bool]]:
    """The verifier reward and format flag of each record's response."""
    results = [compute_reward(rec["domain"], text, rec["answer"], style=style) for rec, text in zip(records, texts)]
    return [r.reward for r in results], [r.format_ok for r in results]


def score(records: Sequence[dict], texts: Sequence[str], style: str) -> dict[str, Any]:
    return summarize_rewards(records, *prompt_rewards(records, texts, style))


def summarize_rewards(records: Sequence[dict], rewards: Sequence[float], formats: Sequence[bool]) -> dict[str, Any]:
    """Accuracy per domain and tier, format rate and count from per-record rewards and format flags."""
    by_domain, by_tier = defaultdict(list), defaultdict(lambda: defaultdict(list))
    for rec, reward in zip(records, rewards):
        by_domain[rec["domain"]].append(reward)
        by_tier[rec["domain"]][str(rec.get("tier", "all"))].append(reward)
    return {"accuracy": {d: float(np.mean(v)) for d, v in sorted(by_domain.items())},
            "by_tier": {d: {t: float(np.mean(v)) for t, v in sorted(ts.items())} for d, ts in sorted(by_tier.items())},
            "format_rate": float(np.mean(formats)) if len(formats) else 0.0, "n": len(rewards)}


def evaluate(exp, params, *, split: str = "heldout", per_domain: int | None = None) -> dict[str, Any]:
    """Greedy accuracy and (eval.samples > 0) sampled mean@k per prompt, domain and overall with standard
    errors (stats.summarize), answer-prior baselines (baselines.baselines, synthetic suite only) and the
    per-prompt rows ("prompts": id, domain, tier, greedy, sampled) that paired stage comparisons need."""
    ev = exp.cfg.get("eval") or {}
    per_domain = per_domain or ev.get("per_domain", 32)
    style, seed, tiers = ev.get("style", "glm41v"), ev.get("seed", 0), ev.get("tiers")
    records = prompt_records(exp.cfg, split, per_domain, seed=seed, tiers=tiers)
    check_answer_budget(exp.cfg, exp.tokenizer, split, per_domain, seed, tiers, ev.get("max_new_tokens", 48), "eval")
    options = dict(max_new_tokens=ev.get("max_new_tokens", 48), batch_size=ev.get("batch_size", 32), style=style,
                   checks=image_checks(exp.cfg.data))
    texts = generate_answers(exp, params, records, **options)
    greedy, formats = prompt_rewards(records, texts, style)     # the verifiers run once per response
    result = summarize_rewards(records, greedy, formats)
    rows = [{"id": str(rec["id"]), "domain": rec["domain"], "tier": rec.get("tier"), "greedy": g}
            for rec, g in zip(records, greedy)]
    k = int(ev.get("samples", 0) or 0)
    if k:
        groups = sample_answers(exp, params, records, k, temperature=ev.get("temperature", 1.0), seed=seed + 1,
                                **options)
        for row, rec, group in zip(rows, records, groups):
            row["sampled"] = float(np.mean(prompt_rewards([rec] * k, group, style)[0]))
    result["samples"] = k
    result["prompts"] = rows
    result["summary"] = stats.summarize(rows)
    if exp.cfg.data.source == "synthetic":
        train = prompt_records(exp.cfg, "train", per_domain, seed=seed, tiers=tiers)
        result["baselines"] = baselines(train, records, style)
    result["examples"] = [{"domain": r["domain"], "answer": str(r["answer"]), "response": t}
                          for r, t in list(zip(records, texts))[::max(1, len(records) // 8)]]
    return result


def run_eval(exp) -> dict[str, Any]:
    """The eval stage: params from `train.init_from` (a previous stage) or an HF checkpoint."""
    abstract, shardings = param_shardings(exp)
    params = initial_params(exp, abstract, shardings)
    if params is None:
        raise ValueError("the eval stage needs train.init_from (a stage work directory) or model.hf_checkpoint")
    result = evaluate(exp, params)
    with open(os.path.join(exp.workdir, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    return {"stage": "eval", "eval": result}
