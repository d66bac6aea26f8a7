"""Offline difficulty for RLCS: pass@k per prompt -> difficulty = 1 - pass rate, merged over models and with
human labels, written as JSONL (one record per prompt) that `samplers.PromptPool.from_records` reads.

    recs = measure_difficulty(prompts, generate_fn, reward_fn, k=8)   # generate_fn(prompts, n) -> [[str] * n]
    merged = merge_difficulties({"sft": recs, "rl_ckpt_3": other}, human={"id7": "hard"})
    write_jsonl(merged, "difficulty.jsonl")

    python -m glmv_jax.rl.difficulty --checkpoint ckpt/ --prompts rl.jsonl --out difficulty.jsonl --k 8

A sample passes when its reward > threshold (0.75 as glmv_reward's pass@k log; any value in (0, 1) is the
same for binary rewards). The CLI builds its generate_fn with `--generator module:factory`, by default
`glmv_jax.generate.loading:make_generate_fn(checkpoint, max_new_tokens=, temperature=, top_p=, seed=, style=)`.
A prompt record the reward system cannot score (an unknown domain, an answer its verifier rejects) is
skipped before generation: one warning names each (manifest:line, id, reason) and the summary counts them.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from glmv_jax.cli import doc_parser
from glmv_jax.evaluation.evaluate import read_manifest
from glmv_jax.rewards import compute_rewards, registry
from glmv_jax.rl.samplers import tier_of

TIER_NAMES = ("very easy", "easy", "medium", "hard", "very hard")
DEFAULT_GENERATOR = "glmv_jax.generate.loading:make_generate_fn"
GenerateFn = Callable[[Sequence[dict], int], Sequence[Sequence[str]]]
RewardFn = Callable[[dict, Sequence[str]], Sequence[float]]   # (prompt record, its responses) -> rewards


@dataclasses.dataclass
class DifficultyRecord:
    id: str
    domain: str
    difficulty: float                  # 1 - pass_rate (merged: weighted over sources and human label)
    pass_rate: float                   # passes / samples
    k: int                             # samples drawn
    num_pass: int
    mean_reward: float
    sources: dict = dataclasses.field(default_factory=dict)   # source name -> its difficulty (+ "human")

    @property
    def pass_at_k(self) -> bool:
        return self.num_pass > 0


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def measure_difficulty(prompts: Sequence[dict], generate_fn: GenerateFn, reward_fn: RewardFn, *, k: int = 8,
                       threshold: float = 0.75, batch_size: int = 16, source: str = "model") -> list[DifficultyRecord]:
    """pass@k of every prompt (records with "id" and "domain") -> DifficultyRecords in the same order."""
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be >= 1, got {k}, {batch_size}")
    out = []
    for chunk in _batches(list(prompts), batch_size):
        responses = generate_fn(chunk, k)
        if len(responses) != len(chunk):
            raise ValueError(f"generate_fn returned {len(responses)} response lists for {len(chunk)} prompts")
        for prompt, group in zip(chunk, responses):
            if len(group) != k:
                raise ValueError(f"generate_fn returned {len(group)} responses for prompt {prompt.get('id')!r}, "
                                 f"expected k={k}")
            rewards = np.asarray(reward_fn(prompt, group), np.float64)
            if rewards.shape != (k,):
                raise ValueError(f"reward_fn returned shape {rewards.shape} for {k} responses")
            passes = int((rewards > threshold).sum())
            difficulty = 1.0 - passes / k
            out.append(DifficultyRecord(str(prompt["id"]), str(prompt["domain"]), difficulty, passes / k, k, passes,
                                        float(rewards.mean()), {source: difficulty}))
    return out


def human_difficulty(label: Any) -> float:
    """A human label -> difficulty: a number in [0, 1], or a tier name ("very easy" .. "very hard") -> its centre."""
    if isinstance(label, str):
        name = label.strip().lower().replace("_", " ")
        if name not in TIER_NAMES:
            raise ValueError(f"unknown human difficulty label {label!r}; expected one of {TIER_NAMES} or a number")
        return (TIER_NAMES.index(name) + 0.5) / len(TIER_NAMES)
    value = float(label)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"human difficulty must be in [0, 1], got {label!r}")
    return value


def merge_difficulties(per_source: Mapping[str, Sequence[DifficultyRecord]], *, human: Mapping[str, Any] | None = None,
                       human_weight: float = 0.5, source_weights: Mapping[str, float] | None = None
                       ) -> list[DifficultyRecord]:
    """Pool several models' pass@k runs (sample-weighted, times `source_weights`) and blend in human labels:
    difficulty = (1 - human_weight) * models + human_weight * human where both exist. Order: first appearance."""
    if not 0.0 <= human_weight <= 1.0:
        raise ValueError(f"human_weight must be in [0, 1], got {human_weight}")
    merged: dict[str, DifficultyRecord] = {}
    totals: dict[str, list[float]] = {}                # id -> [weighted difficulty sum, weight sum]
    for name, records in per_source.items():
        w_source = float((source_weights or {}).get(name, 1.0))
        for rec in records:
            cur = merged.get(rec.id)
            if cur is None:
                merged[rec.id] = cur = DifficultyRecord(rec.id, rec.domain, 0.0, 0.0, 0, 0, 0.0, {})
                totals[rec.id] = [0.0, 0.0]
            elif cur.domain != rec.domain:
                raise ValueError(f"prompt {rec.id!r} has domain {cur.domain!r} in one source and {rec.domain!r} in {name!r}")
            w = w_source * rec.k
            totals[rec.id][0] += w * rec.difficulty
            totals[rec.id][1] += w
            cur.mean_reward = (cur.mean_reward * cur.k + rec.mean_reward * rec.k) / (cur.k + rec.k)
            cur.k, cur.num_pass = cur.k + rec.k, cur.num_pass + rec.num_pass
            cur.pass_rate = cur.num_pass / cur.k
            cur.sources[name] = rec.difficulty
    for rid, rec in merged.items():
        rec.difficulty = totals[rid][0] / totals[rid][1] if totals[rid][1] > 0 else 1.0 - rec.pass_rate
    for rid, label in (human or {}).items():
        if rid not in merged:
            raise ValueError(f"human label for unknown prompt {rid!r}")
        value = human_difficulty(label)
        rec = merged[rid]
        rec.sources["human"] = value
        rec.difficulty = (1.0 - human_weight) * rec.difficulty + human_weight * value
    return list(merged.values())


def assign_tiers(records: Sequence[DifficultyRecord], num_tiers: int = len(TIER_NAMES)) -> np.ndarray:
    """[N] tier per record: 0 = very easy .. num_tiers - 1 = very hard."""
    return tier_of(np.asarray([r.difficulty for r in records]), num_tiers)


def write_jsonl(records: Sequence[DifficultyRecord], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(dataclasses.asdict(rec), ensure_ascii=False) + "\n")


def read_jsonl(path: str) -> list[DifficultyRecord]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append(DifficultyRecord(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: not a difficulty record ({e})") from None
    return out


def difficulty_map(records: Sequence[DifficultyRecord]) -> dict[str, float]:
    """id -> difficulty, for samplers.PromptPool.from_records(records, difficulties=...)."""
    return {r.id: r.difficulty for r in records}


# ----------------------------------------------------------------------------------------------- CLI

def _read_human(path: str) -> dict[str, Any]:
    labels = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                rec = json.loads(line)
                if "id" not in rec or ("difficulty" not in rec and "label" not in rec):
                    raise ValueError(f"{path}:{line_no}: a human label needs 'id' and 'difficulty' or 'label'")
                labels[str(rec["id"])] = rec.get("difficulty", rec.get("label"))
    return labels


def _load_factory(spec: str) -> Callable[..., GenerateFn]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SystemExit(f"cannot import the generator module {module_name!r} ({e}); pass --generator module:factory")
    if not hasattr(module, attr or "make_generate_fn"):
        raise SystemExit(f"{module_name} has no {attr or 'make_generate_fn'!r}; pass --generator module:factory")
    return getattr(module, attr or "make_generate_fn")


def unscorable_reason(prompt: dict) -> str | None:
    """Why the reward system cannot score responses to `prompt` (unknown domain, an answer its domain's
    verifier.reference rejects), or None when it can."""
    try:
        registry.check_domain(prompt["domain"])
        verifier = registry.verifier_for(prompt["domain"])
        if verifier is not None:
            verifier.reference(prompt["answer"])
    except ValueError as error:
        return str(error)
    return None


def split_scorable(prompts: Sequence[dict]) -> tuple[list[dict], list[str]]:
    """(the prompts the reward system can score, "manifest:line (id=...): reason" for each of the others)."""
    good, skipped = [], []
    for prompt in prompts:
        reason = unscorable_reason(prompt)
        if reason is None:
            good.append(prompt)
        else:
            skipped.append(f"{prompt.get('_where', '?')} (id={prompt.get('id')!r}): {reason}")
    return good, skipped


def reward_fn_for(style: str) -> RewardFn:
    """The project's reward system as a RewardFn (a group of responses to one prompt)."""
    def reward_fn(prompt: dict, responses: Sequence[str]) -> list[float]:
        return [r.reward for r in compute_rewards(prompt["domain"], list(responses), prompt["answer"], style=style)]
    return reward_fn


def main(argv: Sequence[str] | None = None) -> list[DifficultyRecord]:
    ap = doc_parser("python -m glmv_jax.rl.difficulty", __doc__)
    ap.add_argument("--checkpoint", required=True, help="model checkpoint dir (HF safetensors or ours)")
    ap.add_argument("--prompts", required=True, help="JSONL of RL prompt records (id, domain, messages, answer)")
    ap.add_argument("--out", required=True, help="output JSONL of per-prompt difficulty")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=0.75, help="a sample passes when reward > threshold")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--style", default="glm41v", help="response format for the reward system")
    ap.add_argument("--source", default=None, help="name of this model in the merged file (default: checkpoint)")
    ap.add_argument("--merge", nargs="*", default=[], help="earlier difficulty JSONLs (other models) to merge")
    ap.add_argument("--human", default=None, help="JSONL of {id, difficulty | label} human labels")
    ap.add_argument("--human-weight", type=float, default=0.5)
    ap.add_argument("--generator", default=DEFAULT_GENERATOR,
                    help="module:factory; factory(checkpoint, max_new_tokens=, temperature=, top_p=, seed=, style=)")
    args = ap.parse_args(argv)

    prompts, skipped = split_scorable(read_manifest(args.prompts, required=("id", "domain", "answer")))
    if skipped:
        print(f"warning: skipped {len(skipped)} prompt record(s) with an invalid answer or domain:\n  " +
              "\n  ".join(skipped), file=sys.stderr)
    generate_fn = _load_factory(args.generator)(args.checkpoint, max_new_tokens=args.max_new_tokens,
                                                temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                                style=args.style)
    source = args.source or os.path.basename(os.path.normpath(args.checkpoint))
    records = measure_difficulty(prompts, generate_fn, reward_fn_for(args.style), k=args.k,
                                 threshold=args.threshold, batch_size=args.batch_size, source=source)
    per_source = {source: records}
    for path in args.merge:
        per_source[os.path.basename(path)] = read_jsonl(path)
    human = _read_human(args.human) if args.human else None
    merged = merge_difficulties(per_source, human=human, human_weight=args.human_weight)
    write_jsonl(merged, args.out)
    tiers = np.bincount(assign_tiers(merged), minlength=len(TIER_NAMES))
    print(f"wrote {len(merged)} prompts to {args.out} (skipped {len(skipped)} with an invalid answer or domain); "
          "tiers " + ", ".join(f"{name}: {n}" for name, n in zip(TIER_NAMES, tiers)))
    return merged


if __name__ == "__main__":
    main()
