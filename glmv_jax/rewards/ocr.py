"""OCR: 1 - normalised edit distance (Levenshtein / max length, via rapidfuzz) between the box and the reference.

Whitespace runs are collapsed to one space on both sides; case is kept unless config.ocr_ignore_case.
A box holding control, format, surrogate, private-use or unassigned characters that the reference does
not hold scores 0 (junk earns no partial credit), and so does a box over 10x + 100 the reference's length
(its similarity would be under 0.1 anyway; this caps the cost and the credit of dumping text).
"""
from __future__ import annotations

import unicodedata

from rapidfuzz.distance import Levenshtein

from glmv_jax.rewards.result import RewardConfig


def _normalize(text: str, ignore_case: bool) -> str:
    text = " ".join(text.split())
    return text.casefold() if ignore_case else text


_JUNK_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})


def _junk(text: str) -> set[str]:
    return {c for c in set(text) if unicodedata.category(c) in _JUNK_CATEGORIES and c not in "\t\n\r"}


def reference(answer) -> str:
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"ocr answer must be a non-empty string, got {answer!r}")
    return answer


def score(extracted: str, reference: str, config: RewardConfig) -> tuple[float, dict]:
    if len(extracted) > 10 * len(reference) + 100:
        return 0.0, {"reason": "too_long"}
    if _junk(extracted) - _junk(reference):
        return 0.0, {"reason": "bad_chars"}
    pred = _normalize(extracted, config.ocr_ignore_case)
    return float(Levenshtein.normalized_similarity(pred, _normalize(reference, config.ocr_ignore_case))), {}
