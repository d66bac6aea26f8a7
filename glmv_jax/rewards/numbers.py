"""Cheap exact parsing of plain numbers (no sympy): the fast path of math, chart and counting."""
from __future__ import annotations

import re
from fractions import Fraction

_MAX_NUMBER_CHARS = 64
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][+-]?\d{1,3})?|\.\d+(?:[eE][+-]?\d{1,3})?"
_DECIMAL = re.compile(rf"([+-]?)({_UNSIGNED})")
_RATIO = re.compile(rf"([+-]?)({_UNSIGNED})/({_UNSIGNED})")
_LATEX_FRAC = re.compile(rf"([+-]?)\\[dt]?frac\{{\s*([+-]?)({_UNSIGNED})\s*\}}\{{\s*({_UNSIGNED})\s*\}}")
_SIGN_SPACE = re.compile(r"^([+-])\s+")
_LATEX_THOUSANDS = re.compile(r"(?<=\d)(?:\{,\}|,\\!)(?=\d{3}(?!\d))")  # 14{,}916, 32,\!349
_INTEGER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)")
_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}


def _unsigned(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def _signed(sign: str, value: Fraction) -> Fraction:
    return -value if sign == "-" else value


def clean(text: str) -> str:
    """Strip outer whitespace, math delimiters ($, \\( \\), \\[ \\]) and a final period; unicode minus -> '-';
    LaTeX thousands separators ({,} and ,\\!) -> ','."""
    text = text.strip().replace("\u2212", "-")
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            text = text[len(left):-len(right)].strip()
            break
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    return _LATEX_THOUSANDS.sub(",", text)


def parse_number(text: str) -> Fraction | None:
    """Exact value of a plain number: 42, -3.5, 1,234, 1e-3, 7/8, \\frac{7}{8}, -\\dfrac{1}{2}; else None.

    Only a space after a leading sign is allowed ("- 1"); nothing else (units, words, %, "1 2") is accepted.
    """
    text = _SIGN_SPACE.sub(r"\1", clean(text))
    if not text or len(text) > _MAX_NUMBER_CHARS:
        return None
    if match := _DECIMAL.fullmatch(text):
        return _signed(match[1], _unsigned(match[2]))
    match = _RATIO.fullmatch(text) or _LATEX_FRAC.fullmatch(text)
    if match is None:
        return None
    groups = match.groups()
    numerator, denominator = _unsigned(groups[-2]), _unsigned(groups[-1])
    if denominator == 0:
        return None
    sign = -1 if groups[:-2].count("-") % 2 else 1
    return sign * numerator / denominator


def parse_integer(text: str, words: bool = True) -> int | None:
    """An integer written as digits (thousands commas allowed) or, if `words`, an English word zero..twenty.

    Past _MAX_NUMBER_CHARS it is None (int() of over 4300 digits raises, and no count is that long).
    """
    text = clean(text)
    if len(text) > _MAX_NUMBER_CHARS:
        return None
    if _INTEGER.fullmatch(text):
        return int(text.replace(",", ""))
    if words:
        return _WORDS.get(text.lower())
    return None


def close(value: Fraction, reference: Fraction, rel_tol: float) -> bool:
    """|value - reference| <= rel_tol * |reference| (exact equality when the reference is 0 or rel_tol is 0)."""
    return abs(value - reference) <= Fraction(rel_tol) * abs(reference)
