"""Deliberately weakened verifiers, for the weak-verifier experiment (docs/rl.md "Reward health"; the paper's
Sec. 5.2: one lenient verifier in one sub-domain let the policy hack its reward and took down the whole
multi-domain run). Never a default: the RL stage uses one only where `rl.reward_overrides` names it
({domain: weakened verifier name}); evaluation, the pilot and the reward-health probe always use the real
verifiers (registry.VERIFIERS).

Each is a verifier like the real ones (reference(answer), score(box_text, reference, config)):

- counting_upper_bound: a lenient judge of counts that reads "there are N" as "up to N" and accepts any
  range "a-b" / "a to b" / "between a and b" that covers the reference. A policy exploits it by answering
  large numbers: every over-count is paid, only under-counts are refused.
- contains_gold: a lenient judge for any domain whose reference is a short string or number: pays a box whose
  text contains the reference anywhere ("3 or 4" for 4; "ABCD" for "C"), as a judge asked "does the answer
  mention the right value?" would.
"""
from __future__ import annotations

import re
import types

from glmv_jax.rewards import counting, numbers
from glmv_jax.rewards.result import RewardConfig

_RANGE = re.compile(r"^\s*(?:between\s+)?(\d{1,6})\s*(?:-|–|~|to|and)\s*(\d{1,6})\s*$", re.IGNORECASE)


def _upper_bound_score(extracted: str, reference: int, config: RewardConfig) -> tuple[float, dict]:
    del config
    text = numbers.clean(extracted)
    match = _RANGE.match(text)
    if match:
        lo, hi = sorted((int(match.group(1)), int(match.group(2))))
        return float(lo <= reference <= hi), {"weak": "range"}
    value = numbers.parse_integer(text)
    if value is None:
        return 0.0, {"reason": "not_an_integer"}
    return float(value >= reference), {"weak": "upper_bound"}


def _contains_reference(answer) -> str:
    if isinstance(answer, bool) or not isinstance(answer, (str, int)):
        raise ValueError(f"contains_gold needs a string or integer answer, got {answer!r}")
    text = str(answer).strip()
    if not text:
        raise ValueError("contains_gold needs a non-empty answer")
    return text


def _contains_score(extracted: str, reference: str, config: RewardConfig) -> tuple[float, dict]:
    del config
    return float(reference.lower() in extracted.lower()), {"weak": "contains"}


WEAKENED: dict[str, types.SimpleNamespace] = {
    "counting_upper_bound": types.SimpleNamespace(reference=counting.reference, score=_upper_bound_score),
    "contains_gold": types.SimpleNamespace(reference=_contains_reference, score=_contains_score),
}
