"""Domain -> verifier table.

A verifier is a module with reference(answer) -> prepared reference (raises ValueError on a malformed
one) and score(extracted_box_text, prepared_reference, config) -> (reward, info).
"""
from __future__ import annotations

import types

from glmv_jax.rewards import chart, choice, counting, grounding, gui, judge, math, ocr

VERIFIERS: dict[str, types.ModuleType] = {
    "math": math,
    "choice": choice,
    "counting": counting,
    "chart": chart,
    "ocr": ocr,
    "grounding": grounding,
    "gui": gui,
}


def domains() -> tuple[str, ...]:
    """Every domain compute_reward accepts now: the verifiable ones and those with a registered judge."""
    return tuple(VERIFIERS) + judge.judged_domains()


def check_domain(domain: str) -> None:
    """Raise for a domain with neither a verifier nor a judge (a programming error, not a model error)."""
    if domain not in VERIFIERS and judge.get_judge(domain) is None:
        raise ValueError(f"unknown reward domain {domain!r}; known: {', '.join(domains())} "
                         f"(open-ended domains need register_judge first)")
