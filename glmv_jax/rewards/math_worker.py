"""Symbolic equivalence with math-verify; runs only inside a worker process (see workers.py).

Only math-verify's LaTeX path is used (latex2sympy2 builds sympy objects from an ANTLR parse tree); its
plain-expression path, which goes through sympy's eval-based parse_expr, is not. Its own signal-based
timeouts are off: the parent process enforces the budget by killing this process.
"""
from __future__ import annotations

import functools
import logging

from math_verify import LatexExtractionConfig, parse, verify

logging.getLogger("math_verify").setLevel(logging.ERROR)
_EXTRACTION = [LatexExtractionConfig()]


def _parse(text: str) -> list:
    return parse(f"${text}$", extraction_config=_EXTRACTION, fallback_mode="no_fallback",
                 parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _parse_reference(text: str) -> list:
    return _parse(text)  # the same reference is scored against a whole group of responses


def equivalent(reference: str, prediction: str) -> dict:
    """{"equal": bool} and, when a side does not parse, "reason"."""
    gold = _parse_reference(reference)
    if not gold:
        return {"equal": False, "reason": "reference_unparsed"}
    pred = _parse(prediction)
    if not pred:
        return {"equal": False, "reason": "unparsed"}
    return {"equal": bool(verify(gold, pred, timeout_seconds=None))}


def warm_up() -> None:
    """First calls into sympy / ANTLR are several times slower than later ones: pay that at startup."""
    for reference, prediction in (("x^2-1", "(x-1)(x+1)"), ("2\\sqrt{2}", "\\sqrt{8}"), ("\\frac{1}{2}", "0.5"),
                                  ("\\pi", "3\\pi/3"), ("(1,2]", "[1,2)"), ("x=3", "3")):
        equivalent(reference, prediction)
