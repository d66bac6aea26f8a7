"""Domain -> verifier table. A verifier is score(extracted_box_text, answer, config) -> (reward, info)."""
from __future__ import annotations

from typing import Any, Callable

from glmv_jax.rewards import chart, choice, counting, grounding, gui, judge, math, ocr
from glmv_jax.rewards.result import RewardConfig

Verifier = Callable[[str, Any, RewardConfig], "tuple[float, dict]"]

VERIFIERS: dict[str, Verifier] = {
    "math": math.score,
    "choice": choice.score,
    "counting": counting.score,
    "chart": chart.score,
    "ocr": ocr.score,
    "grounding": grounding.score,
    "gui": gui.score,
}


def domains() -> tuple[str, ...]:
    """Every domain compute_reward accepts now: the verifiable ones and those with a registered judge."""
    return tuple(VERIFIERS) + judge.judged_domains()


def check_domain(domain: str) -> None:
    """Raise for a domain with neither a verifier nor a judge (a programming error, not a model error)."""
    if domain not in VERIFIERS and judge.get_judge(domain) is None:
        raise ValueError(f"unknown reward domain {domain!r}; known: {', '.join(domains())} "
                         f"(open-ended domains need register_judge first)")
