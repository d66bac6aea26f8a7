"""Pluggable judges for open-ended domains (an LLM judge, a reward model). None is registered by default.

A judge is fn(answer_text, reference, context) -> float in [0, 1], where answer_text is the response's
answer section (for open-ended data it must hold no box: the paper gives any box marker the minimum
reward) and context is the dict passed to compute_reward (question, image paths, ...). Judges cannot
take over a built-in verifiable domain: a text judge is what hedged answers fooled in the paper.
"""
from __future__ import annotations

import math
import threading
from typing import Any, Callable

Judge = Callable[[str, Any, dict], float]

_judges: dict[str, Judge] = {}
_lock = threading.Lock()


def register_judge(domain: str, fn: Judge) -> None:
    """Use `fn` to score `domain`. Raises ValueError for a built-in verifiable domain or a taken name."""
    from glmv_jax.rewards.registry import VERIFIERS
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
