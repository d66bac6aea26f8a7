"""Heavy-repetition detector (looping generations).

A response is heavily repetitive when some `window`-char span occurs `max_repeats` or more times without
overlap. Every window (stride 1, so any period is caught) gets a polynomial rolling hash computed with
numpy in uint64 wrap-around arithmetic; the most frequent hashes give candidate spans whose real count is
then taken with str.count (exact and non-overlapping, so one long run of a single character
"-----..." counts once per window length, not once per position, and hash collisions cannot inflate it).
"""
from __future__ import annotations

import numpy as np

_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, hence invertible modulo 2**64
_BASE_INV = np.uint64(pow(int(_BASE), -1, 2**64))
_CANDIDATES = 4


def _window_hashes(text: str, window: int) -> np.ndarray:
    """uint64 hash of text[i:i+window] for every i: sum_t code[i+t] * BASE**t (mod 2**64). Shape [n-w+1]."""
    # surrogatepass: a lone surrogate ("\ud800", which a model can emit) is one code like any other
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    n = codes.shape[0]
    powers = np.cumprod(np.full(n, _BASE, dtype=np.uint64)) * _BASE_INV      # BASE**t, t = 0..n-1
    inverse_powers = np.cumprod(np.full(n, _BASE_INV, dtype=np.uint64)) * _BASE  # BASE**-t
    prefix = np.concatenate([np.zeros(1, np.uint64), np.cumsum(codes * powers)])
    return (prefix[window:] - prefix[:n - window + 1]) * inverse_powers[:n - window + 1]


def max_repeats(text: str, window: int = 50) -> int:
    """Largest non-overlapping occurrence count of any `window`-char span of `text` (0 if shorter)."""
    if len(text) < window:
        return 0
    with np.errstate(over="ignore"):
        hashes = _window_hashes(text, window)
    values, counts = np.unique(hashes, return_counts=True)
    top_values = values[np.argpartition(counts, -_CANDIDATES)[-_CANDIDATES:]] if len(values) > _CANDIDATES else values
    starts = [int(np.argmax(hashes == v)) for v in top_values]
    return max(text.count(text[i:i + window]) for i in starts)


def is_heavily_repetitive(text: str, window: int = 50, max_repeats_allowed: int = 10) -> tuple[bool, int]:
    """(repetitive?, the count); fewer than window * max_repeats_allowed chars cannot be repetitive."""
    if len(text) < window * max_repeats_allowed:
        return False, 0
    count = max_repeats(text, window)
    return count >= max_repeats_allowed, count
