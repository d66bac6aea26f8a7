"""Chart QA: numbers within a relative tolerance (RewardConfig.chart_rel_tol, 2%), years exactly, text answers
by normalised exact match.

A reference "looks like a year" when it is written as a 4-digit integer without separators ("2019", not
"2,019" or "2019.0"): then the prediction must be that integer exactly. A trailing % (or \\%) is ignored
on both sides (chart values are often percentages). GLM-V's glmv_reward uses 2.5% (its chart verifier's
sympy_tolerance): RewardConfig(chart_rel_tol=GLMV_REL_TOL).
"""
from __future__ import annotations

import re
from fractions import Fraction

from glmv_jax.rewards import numbers
from glmv_jax.rewards.result import RewardConfig

GLMV_REL_TOL = 0.025
_YEAR = re.compile(r"[12]\d{3}")


def _strip_percent(text: str) -> str:
    text = numbers.clean(text)
    for suffix in ("\\%", "%"):
        if text.endswith(suffix):
            return text[:-len(suffix)].rstrip()
    return text


def _text_key(text: str) -> str:
    return " ".join(numbers.clean(text).casefold().split())


def reference(answer) -> tuple[str, Fraction | None, bool]:
    """(text key, numeric value or None for a text answer, looks like a year)."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"chart answer must be a number or a string, got {type(answer).__name__}: {answer!r}")
    text = _strip_percent(str(answer))
    if not text:
        raise ValueError("chart answer is empty")
    return _text_key(str(answer)), numbers.parse_number(text), bool(_YEAR.fullmatch(text))


def score(extracted: str, reference: tuple, config: RewardConfig) -> tuple[float, dict]:
    text_key, number, is_year = reference
    if number is None:  # a text answer (a label, a series name)
        return float(_text_key(extracted) == text_key), {"kind": "text"}
    value = numbers.parse_number(_strip_percent(extracted))
    if value is None:
        return 0.0, {"reason": "not_a_number"}
    if is_year:
        return float(value == number), {"kind": "year"}
    return float(numbers.close(value, number, config.chart_rel_tol)), {"kind": "number"}
