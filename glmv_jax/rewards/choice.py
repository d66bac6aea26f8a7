"""Multiple choice: 1 if the boxed letters are exactly the reference's set of letters.

Accepted: "B", "(B)", "b", "B.", "A, C", "A C", "A;C", "AC" (compact, upper case). Words ("A or C",
"B) Paris"), duplicates and any other text score 0; listing every option is simply the wrong set.
"""
from __future__ import annotations

import re

from glmv_jax.rewards.result import RewardConfig

_TOKEN = re.compile(r"\(?([A-Za-z])\)?\.?")
_SEPARATORS = re.compile(r"\s*[,;/\s]\s*")
_COMPACT = re.compile(r"[A-Z]{2,26}")


def parse_letters(text: str) -> list[str] | None:
    """Upper-case letters in order of appearance, or None if `text` is not a plain letter list."""
    text = text.strip()
    if _COMPACT.fullmatch(text):
        return list(text)
    letters = []
    for token in _SEPARATORS.split(text):
        match = _TOKEN.fullmatch(token)
        if match is None:
            return None
        letters.append(match[1].upper())
    return letters


def reference(answer) -> frozenset[str]:
    letters = None
    if isinstance(answer, str):
        letters = parse_letters(answer)
    elif isinstance(answer, (list, tuple, set, frozenset)):
        singles = [parse_letters(a) if isinstance(a, str) else None for a in answer]
        if all(single is not None and len(single) == 1 for single in singles):
            letters = [single[0] for single in singles]
    if not letters:
        raise ValueError(f"choice answer must be letters like 'B' or 'A,C', got {answer!r}")
    return frozenset(letters)


def score(extracted: str, reference: frozenset[str], config: RewardConfig) -> tuple[float, dict]:
    letters = parse_letters(extracted)
    if letters is None:
        return 0.0, {"reason": "not_letters"}
    if len(set(letters)) != len(letters):
        return 0.0, {"reason": "duplicate_letters"}
    return float(frozenset(letters) == reference), {"letters": "".join(sorted(letters))}
