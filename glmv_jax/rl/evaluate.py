"""Held-out evaluation: greedy answers to prompts of the built-in suite (or a JSONL prompt set), scored by
the domain verifiers. Accuracy = mean reward per domain (and per tier).

    result = evaluate(exp, params)      # {"accuracy": {domain: a}, "by_tier": {domain: {tier: a}}, ...}
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Sequence

import jax
import numpy as np

from glmv_jax.rewards import compute_reward


def prompt_records(cfg, split: str, per_domain: int, seed: int, tiers: Any = None) -> list[dict]:
    """RL/eval prompt records: the synthetic suite by domain, or the configured JSONL manifests."""
    if cfg.data.source == "synthetic":
        from glmv_jax.data.pipeline import _tiers
        from glmv_jax.data.synthetic import generate
        tiers = _tiers(tiers)
        records = []
        for domain in cfg.data.domains:
            records += generate(domain, per_domain, seed=seed, split=split, kind="rl", tiers=tiers,
                                image_size=cfg.data.image_size)
        return records
    import json
    records = []
    for manifest in cfg.data.manifests:
        with open(manifest) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{manifest}:{n}: invalid JSON ({e})") from None
                    records.append({**record, "base_dir": os.path.dirname(os.path.abspath(manifest))})
    return records


def generate_answers(exp, params, records: Sequence[dict], *, max_new_tokens: int, batch_size: int,
                     temperature: float = 0.0, seed: int = 0, style: str = "glm41v") -> list[str]:
    """One response text per record (greedy when temperature is 0), generated batch_size prompts at a time."""
    from glmv_jax.rl.rollout import prompt_dicts
    from glmv_jax.rl.sampler import answer_ids, generate, response_text
    force, extra_stops = answer_ids(exp.tokenizer, style)
    stops = tuple(exp.tokenizer.stop_ids) + tuple(extra_stops)
    prompts = prompt_dicts(records, exp.tokenizer, exp.processor)
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))       # one compiled shape for every batch
        out = generate(exp.model_config, params, chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                       stop_ids=stops, rng=jax.random.key(seed + start), force_answer_ids=force,
                       pad_id=exp.tokenizer.pad_id)
        texts += [response_text(exp.tokenizer, out["tokens"][r], out["lengths"][r]) for r in range(len(chunk))]
    return texts[:len(prompts)]


def score(records: Sequence[dict], texts: Sequence[str], style: str) -> dict[str, Any]:
    by_domain, by_tier, formats = defaultdict(list), defaultdict(lambda: defaultdict(list)), []
    for rec, text in zip(records, texts):
        result = compute_reward(rec["domain"], text, rec["answer"], style=style)
        by_domain[rec["domain"]].append(result.reward)
        by_tier[rec["domain"]][str(rec.get("tier", "all"))].append(result.reward)
        formats.append(result.format_ok)
    return {"accuracy": {d: float(np.mean(v)) for d, v in sorted(by_domain.items())},
            "by_tier": {d: {t: float(np.mean(v)) for t, v in sorted(ts.items())} for d, ts in sorted(by_tier.items())},
            "format_rate": float(np.mean(formats)) if formats else 0.0, "n": len(texts)}


def evaluate(exp, params, *, split: str = "heldout", per_domain: int | None = None) -> dict[str, Any]:
    ev = exp.cfg.get("eval") or {}
    per_domain = per_domain or ev.get("per_domain", 32)
    style = ev.get("style", "glm41v")
    records = prompt_records(exp.cfg, split, per_domain, seed=ev.get("seed", 0), tiers=ev.get("tiers"))
    texts = generate_answers(exp, params, records, max_new_tokens=ev.get("max_new_tokens", 48),
                             batch_size=ev.get("batch_size", 32), style=style)
    result = score(records, texts, style)
    result["examples"] = [{"domain": r["domain"], "answer": str(r["answer"]), "response": t}
                          for r, t in list(zip(records, texts))[::max(1, len(records) // 8)]]
    return result


def run_eval(exp) -> dict[str, Any]:
    """The eval stage: params from `train.init_from` (a previous stage) or an HF checkpoint."""
    from glmv_jax.train.experiment import initial_params, param_shardings
    abstract, shardings = param_shardings(exp)
    params = initial_params(exp, abstract, shardings)
    if params is None:
        raise ValueError("the eval stage needs train.init_from (a stage work directory) or model.hf_checkpoint")
    result = evaluate(exp, params)
    with open(os.path.join(exp.workdir, "eval.json"), "w") as f:
        import json
        json.dump(result, f, indent=1)
    return {"stage": "eval", "eval": result}
