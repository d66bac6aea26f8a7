"""Evaluate a checkpoint on held-out prompts: greedy accuracy and pass@k per domain (and per tier).

    python -m experiments.evaluate --checkpoint DIR [--split heldout] [--per-domain 32] [--k 4] [--samples N]
        [--temperature 1.0] [--max-new-tokens 256] [--domains math ocr ...] [--manifest prompts.jsonl]
        [--out results.json]

DIR is an HF checkpoint directory (config.json + safetensors + tokenizer.json) or a work directory of
`experiments.run` (a stage directory or a pipeline directory: its last stage with checkpoints). Prompts are
the built-in task suite's `--split` (the run's data and eval settings when DIR is a work directory: domains,
image size, tier mix; else the defaults of experiments/configs/base.py), or the RL prompt records of a JSONL
`--manifest` (id, domain, images relative to the manifest, messages with the user turn, answer, optional tier).

Greedy accuracy = mean verifier reward of one greedy response per prompt. pass@k: `--samples` n >= k
responses per prompt at `--temperature`, a sample passes when its reward > `--threshold` (0.75, as GLM-V's
reward logging), and pass@k = mean over prompts of the unbiased 1 - C(n - c, k) / C(n, k). Prints a table
and writes JSON (aggregates plus every prompt's greedy response and sample rewards).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from experiments.configs.base import base_config
from glmv_jax.cli import doc_parser
from glmv_jax.data.synthetic import DOMAINS
from glmv_jax.data.transforms import Processor
from glmv_jax.evaluation.evaluate import pass_at_k_table, prompt_records, sample_answers, score
from glmv_jax.generate.loading import _is_hf_dir, _run_stage, load_model
from glmv_jax.rewards import compute_reward


def build_parser() -> argparse.ArgumentParser:
    ap = doc_parser("python -m experiments.evaluate", __doc__)
    ap.add_argument("--checkpoint", required=True, help="HF checkpoint dir or experiments.run work dir")
    ap.add_argument("--split", default="heldout", help="task-suite split (heldout is disjoint from train)")
    ap.add_argument("--per-domain", type=int, default=None,
                    help="prompts per domain (suite default: the run's eval.per_domain or 32; manifest: all)")
    ap.add_argument("--domains", nargs="+", default=None, help="only these domains")
    ap.add_argument("--manifest", default=None, help="JSONL of RL prompt records instead of the task suite")
    ap.add_argument("--tiers", default=None, help='suite tier mix, e.g. "0=0.6,1=0.4" (default: the run\'s)')
    ap.add_argument("--k", type=int, default=4, help="pass@k's k (0: greedy accuracy only)")
    ap.add_argument("--samples", type=int, default=None, help="samples per prompt for pass@k, >= k (default k)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for pass@k")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--threshold", type=float, default=0.75, help="a sample passes when its reward > threshold")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval setting or 256")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="rows per generate call (default: the run's or 32); a multiple of --samples lets the "
                         "greedy and sampled passes share one compiled loop")
    ap.add_argument("--seed", type=int, default=0, help="suite seed and sampling seed")
    ap.add_argument("--style", default=None, choices=["glm41v", "glm45v", "glm46v"],
                    help="chat template / answer format (default: the checkpoint's)")
    ap.add_argument("--min-pixels", type=int, default=None, help="image processor pixel budget")
    ap.add_argument("--max-pixels", type=int, default=None)
    ap.add_argument("--out", default=None, help="results JSON (default: print only)")
    return ap


# ----------------------------------------------------------------------------------------------- settings

def run_settings(checkpoint: str):
    """(data ConfigDict with source / domains / image_size / manifests, eval settings dict) of a checkpoint:
    the saved stage config of an experiments.run work directory, else the base config's defaults."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if _is_hf_dir(path):
        cfg = base_config(None, stage="eval")
        return cfg.data, {}
    cfg, _ = _run_stage(path)
    return cfg.data, dict(cfg.get("eval") or {})


def parse_tiers(text: str | None):
    """"0=0.6,1=0.4" -> {0: 0.6, 1: 0.4}."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        tier, sep, weight = item.partition("=")
        try:
            out[int(tier)] = float(weight)
        except ValueError:
            raise ValueError(f"--tiers must look like 0=0.6,1=0.4, got {text!r}") from None
        if not sep:
            raise ValueError(f"--tiers must look like 0=0.6,1=0.4, got {text!r}")
    return out


def load_records(args, data, ev: dict) -> list[dict]:
    """The evaluation prompts: the suite's split over the (selected) domains, or the manifest's records."""
    if args.manifest:
        if not os.path.isfile(args.manifest):
            raise FileNotFoundError(f"manifest {args.manifest} does not exist")
        cfg = ml_collections.ConfigDict({"data": {"source": "jsonl", "manifests": [args.manifest]}})
        records = prompt_records(cfg, args.split, 0, seed=args.seed)
        for n, rec in enumerate(records, 1):
            missing = [key for key in ("id", "domain", "messages", "answer") if key not in rec]
            if missing:
                raise ValueError(f"{args.manifest}: record {n} has no {missing}")
        if args.domains:
            unknown = sorted(set(args.domains) - {r["domain"] for r in records})
            if unknown:
                raise ValueError(f"--domains {unknown} have no records in {args.manifest}")
            records = [r for r in records if r["domain"] in args.domains]
        if args.per_domain is not None:
            seen: dict[str, int] = {}
            kept = []
            for rec in records:
                seen[rec["domain"]] = seen.get(rec["domain"], 0) + 1
                if seen[rec["domain"]] <= args.per_domain:
                    kept.append(rec)
            records = kept
        return records
    domains = list(args.domains or data.domains)
    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown:
        raise ValueError(f"unknown domains {unknown}; the task suite has {list(DOMAINS)}")
    cfg = ml_collections.ConfigDict({"data": {"source": "synthetic", "domains": domains,
                                              "image_size": int(data.image_size)}})
    per_domain = args.per_domain or ev.get("per_domain", 32)
    tiers = parse_tiers(args.tiers) if args.tiers else ev.get("tiers")
    return prompt_records(cfg, args.split, per_domain, seed=args.seed, tiers=tiers)


def check_args(args) -> None:
    if args.k < 0:
        raise ValueError(f"--k must be >= 0 (0: no pass@k), got {args.k}")
    if args.k and (args.samples or args.k) < args.k:
        raise ValueError(f"--samples ({args.samples}) must be >= --k ({args.k}) for the unbiased pass@k")
    if args.k and args.temperature <= 0:
        raise ValueError(f"pass@k needs sampling: --temperature must be > 0, got {args.temperature}")
    if args.per_domain is not None and args.per_domain < 1:
        raise ValueError(f"--per-domain must be >= 1, got {args.per_domain}")


# ----------------------------------------------------------------------------------------------- evaluation

def evaluate_checkpoint(args) -> dict[str, Any]:

    check_args(args)
    data, ev = run_settings(args.checkpoint)
    bundle = load_model(args.checkpoint, args.style)
    processor = bundle.processor
    budget = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v is not None}
    if budget:
        processor = Processor.for_model(bundle.config, template=processor.template, **budget)
    style = processor.template
    records = load_records(args, data, ev)
    if not records:
        raise ValueError("no prompts to evaluate")
    exp = types.SimpleNamespace(model_config=bundle.config, tokenizer=bundle.tokenizer, processor=processor)
    max_new = args.max_new_tokens or ev.get("max_new_tokens", 256)
    batch_size = args.batch_size or ev.get("batch_size", 32)

    texts = [group[0] for group in sample_answers(exp, bundle.params, records, 1, max_new_tokens=max_new,
                                                  batch_size=batch_size, temperature=0.0, style=style)]
    result = {"checkpoint": os.path.abspath(args.checkpoint), "style": style, "max_new_tokens": max_new,
              "prompts": args.manifest or f"suite:{args.split}", "greedy": score(records, texts, style)}
    greedy_rewards = [compute_reward(r["domain"], t, r["answer"], style=style).reward for r, t in zip(records, texts)]
    sample_rewards = None
    if args.k:
        n = args.samples or args.k
        groups = sample_answers(exp, bundle.params, records, n, max_new_tokens=max_new, batch_size=batch_size,
                                temperature=args.temperature, top_p=args.top_p, seed=args.seed + 1, style=style)
        sample_rewards = [[compute_reward(r["domain"], t, r["answer"], style=style).reward for t in group]
                          for r, group in zip(records, groups)]
        result["sampled"] = {"k": args.k, "n": n, "temperature": args.temperature, "top_p": args.top_p,
                             "threshold": args.threshold,
                             **pass_at_k_table(records, sample_rewards, args.k, args.threshold)}
    result["per_prompt"] = [
        {"id": r.get("id"), "domain": r["domain"], "tier": str(r.get("tier", "all")), "answer": str(r["answer"]),
         "greedy_response": t, "greedy_reward": g, **({"sample_rewards": s} if sample_rewards else {})}
        for r, t, g, s in zip(records, texts, greedy_rewards, sample_rewards or [None] * len(records))]
    return result


def format_table(result: dict) -> str:
    """Per domain (and its tiers when there are several): prompts, greedy accuracy, and with sampling the
    mean sample reward and pass@k; a last row averages the domains."""
    greedy, sampled = result["greedy"], result.get("sampled")
    counts: dict[str, dict[str, int]] = {}
    for p in result["per_prompt"]:
        tiers = counts.setdefault(p["domain"], {})
        tiers[p["tier"]] = tiers.get(p["tier"], 0) + 1
    head = "| domain | tier | prompts | greedy acc |"
    if sampled:
        head += f" sample reward (T={sampled['temperature']}) | pass@{sampled['k']} (n={sampled['n']}) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def row(name, tier, n, acc, reward=None, passk=None):
        line = f"| {name} | {tier} | {n} | {acc:.3f} |"
        return line + (f" {reward:.3f} | {passk:.3f} |" if sampled else "")

    for d, tiers in counts.items():
        s = (sampled["sample_reward"][d], sampled["pass_at_k"][d]) if sampled else ()
        lines.append(row(d, "all", sum(tiers.values()), greedy["accuracy"][d], *s))
        if len(tiers) > 1:
            for t, n in sorted(tiers.items()):
                s = (sampled["sample_reward_by_tier"][d][t], sampled["by_tier"][d][t]) if sampled else ()
                lines.append(row("", t, n, greedy["by_tier"][d][t], *s))
    mean = lambda xs: sum(xs) / len(xs)
    s = (mean(list(sampled["sample_reward"].values())), mean(list(sampled["pass_at_k"].values()))) if sampled else ()
    lines.append(row("**mean of domains**", "", len(result["per_prompt"]), mean(list(greedy["accuracy"].values())), *s))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    result = evaluate_checkpoint(args)
    print(format_table(result))
    print(f"format rate (greedy): {result['greedy']['format_rate']:.3f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
