"""Counting: 1 if the boxed text is exactly the reference integer (digits, or an English word zero..twenty)."""
from __future__ import annotations

from glmv_jax.rewards import numbers
from glmv_jax.rewards.result import RewardConfig


def reference(answer) -> int:
    if isinstance(answer, bool):
        raise ValueError(f"counting answer must be an integer, got {answer!r}")
    if isinstance(answer, int):
        return answer
    value = numbers.parse_integer(answer, words=False) if isinstance(answer, str) else None
    if value is None:
        raise ValueError(f"counting answer must be an integer, got {answer!r}")
    return value


def score(extracted: str, reference: int, config: RewardConfig) -> tuple[float, dict]:
    value = numbers.parse_integer(extracted)
    if value is None:
        return 0.0, {"reason": "not_an_integer"}
    return float(value == reference), {}
