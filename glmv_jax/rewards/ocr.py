"""OCR: 1 - normalised edit distance (Levenshtein / max length, via rapidfuzz) between the box and the reference.

Whitespace runs are collapsed to one space on both sides; case is kept unless config.ocr_ignore_case.
"""
from __future__ import annotations

from rapidfuzz.distance import Levenshtein

from glmv_jax.rewards.result import RewardConfig


def _normalize(text: str, ignore_case: bool) -> str:
    text = " ".join(text.split())
    return text.casefold() if ignore_case else text


def reference(answer) -> str:
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"ocr answer must be a non-empty string, got {answer!r}")
    return answer


def score(extracted: str, reference: str, config: RewardConfig) -> tuple[float, dict]:
    pred = _normalize(extracted, config.ocr_ignore_case)
    return float(Levenshtein.normalized_similarity(pred, _normalize(reference, config.ocr_ignore_case))), {}
