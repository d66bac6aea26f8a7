"""Domain -> scorer tables: the rule-based verifiers, and the judges registered for open-ended domains.

A verifier is a module with reference(answer) -> prepared reference (raises ValueError on a malformed
one) and score(extracted_box_text, prepared_reference, config) -> (reward, info).

A judge (an LLM judge, a reward model; none is registered by default) is fn(answer_text, reference,
context) -> float in [0, 1], where answer_text is the response's answer section (for open-ended data it
must hold no box: the paper gives any box marker the minimum reward) and context is the dict passed to
compute_reward (question, image paths, ...). Judges cannot take over a built-in verifiable domain: a text
judge is what hedged answers fooled in the paper.
"""
from __future__ import annotations

import math
import threading
import types
from typing import Any, Callable

from glmv_jax.rewards import chart, choice, counting, grounding, gui, ocr
from glmv_jax.rewards import math as math_verifier
from glmv_jax.rewards.weak import WEAKENED

Judge = Callable[[str, Any, dict], float]

VERIFIERS: dict[str, types.ModuleType] = {
    "math": math_verifier,
    "choice": choice,
    "counting": counting,
    "chart": chart,
    "ocr": ocr,
    "grounding": grounding,
    "gui": gui,
}

_judges: dict[str, Judge] = {}
_lock = threading.Lock()


def register_judge(domain: str, fn: Judge) -> None:
    """Use `fn` to score `domain`. Raises ValueError for a built-in verifiable domain or a taken name."""
    if not isinstance(domain, str) or not domain:
        raise ValueError(f"judge domain must be a non-empty string, got {domain!r}")
    if not callable(fn):
        raise TypeError(f"judge for {domain!r} must be callable, got {type(fn).__name__}")
    if domain in VERIFIERS:
        raise ValueError(f"{domain!r} has a rule-based verifier; judges are only for open-ended domains")
    with _lock:
        if domain in _judges:
            raise ValueError(f"a judge is already registered for {domain!r}; unregister_judge it first")
        _judges[domain] = fn


def unregister_judge(domain: str) -> None:
    with _lock:
        if domain not in _judges:
            raise KeyError(f"no judge registered for {domain!r}")
        del _judges[domain]


def get_judge(domain: str) -> Judge | None:
    return _judges.get(domain)


def judged_domains() -> tuple[str, ...]:
    return tuple(sorted(_judges))


def run_judge(domain: str, fn: Judge, answer_text: str, reference: Any, context: dict) -> float:
    """Call the judge and check its output (a judge bug is a programming error: it raises)."""
    value = fn(answer_text, reference, context)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise ValueError(f"judge for {domain!r} returned {value!r}; expected a float in [0, 1]")
    return float(value)


def verifier_for(domain: str, override: str | None = None) -> types.ModuleType | types.SimpleNamespace | None:
    """The domain's verifier: the real one (None for a judged domain) or, where `override` names one, a
    deliberately weakened verifier from rewards/weak.py (the weak-verifier experiment; never a default)."""
    if override is None:
        return VERIFIERS.get(domain)
    if override not in WEAKENED:
        raise ValueError(f"unknown weakened verifier {override!r} for {domain!r}; known: {', '.join(WEAKENED)}")
    if domain not in VERIFIERS:
        raise ValueError(f"a weakened verifier replaces a rule-based one; {domain!r} has none")
    return WEAKENED[override]


def domains() -> tuple[str, ...]:
    """Every domain compute_reward accepts now: the verifiable ones and those with a registered judge."""
    return tuple(VERIFIERS) + judged_domains()


def check_domain(domain: str) -> None:
    """Raise for a domain with neither a verifier nor a judge (a programming error, not a model error)."""
    if domain not in VERIFIERS and get_judge(domain) is None:
        raise ValueError(f"unknown reward domain {domain!r}; known: {', '.join(domains())} "
                         f"(open-ended domains need register_judge first)")
