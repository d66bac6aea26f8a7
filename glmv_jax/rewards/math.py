"""Math verifier: 1 if the boxed answer equals the reference symbolically or numerically.

Cheapest first: guards on the raw text (characters, length, nesting, hedges, numeric power towers, huge
exponents and factorials), exact string match, exact rational comparison of plain numbers (numbers.py),
and only then math-verify / sympy in a worker process under a hard time budget (math_worker.py,
workers.py). The guards are best effort; the time budget is what bounds every response.
"""
from __future__ import annotations

import os
import re
import threading
from fractions import Fraction

from glmv_jax.rewards import numbers
from glmv_jax.rewards.result import RewardConfig
from glmv_jax.rewards.workers import WorkerPool

EQUIVALENCE_FN = "glmv_jax.rewards.math_worker:equivalent"
"""The function the worker runs: (reference, prediction) -> {"equal": bool, ...}."""

_UNICODE = {"\u2212": "-", "\u00d7": "\\times ", "\u00f7": "\\div ", "\u03c0": "\\pi ", "\u00b7": "\\cdot ",
            "\u221a": "\\sqrt ", "\u221e": "\\infty ", "\u00b1": "\\pm ", "\u2264": "\\le ", "\u2265": "\\ge ",
            "\u2248": "\\approx ", "\u00b2": "^2", "\u00b3": "^3", "\u00b0": "^\\circ "}
_SPACING = re.compile(r"\\(?:[,;:! ]|q?quad\b)")
_TEXT_COMMAND = re.compile(r"\\(?:text|mathrm|textbf|textit|mbox|operatorname)\s*\{([^{}]*)\}")
_COMMAND = re.compile(r"\\([a-zA-Z]+)")
_HEDGE_WORDS = re.compile(
    r"\b(or|and|between|to|either|about|around|approx|approximately|roughly|nearly|almost|maybe|perhaps|"
    r"possibly|probably|likely|somewhere|range|from|unknown|any|some|than|close|least|most)\b", re.IGNORECASE)
_HEDGE_COMMANDS = {"approx", "sim", "simeq", "lesssim", "gtrsim", "le", "leq", "ge", "geq", "lt", "gt", "neq",
                   "ne", "in", "pm", "mp", "cup", "lor", "vee", "land", "wedge", "ldots", "cdots", "dots"}
_HEDGE_SYMBOLS = ("<", ">", "~", "...", "|")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TOWER = re.compile(r"\^[\s{(]*\d+\s*\^")  # a number raised to a power inside an exponent: 9^{9^9}
_BIG_EXPONENT = re.compile(r"\^\s*\{?\s*\(?\s*(\d{5,})")
_BIG_FACTORIAL = re.compile(r"\d{4,}\s*\}?\s*\)?\s*!")
_ALLOWED = re.compile(r"[\x20-\x7e]*")
_BRACKETS = {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}
_RELATION_SPELLING = re.compile(r"\\(leqslant|leq|le|geqslant|geq|ge|lt|gt|neq|ne)(?![a-zA-Z])|<=|>=")
_CANONICAL_RELATION = {"leqslant": "\\leq", "leq": "\\leq", "le": "\\leq", "<=": "\\leq", "geqslant": "\\geq",
                       "geq": "\\geq", "ge": "\\geq", ">=": "\\geq", "lt": "<", "gt": ">", "neq": "\\neq", "ne": "\\neq"}
_ORDER_RELATION = re.compile(r"\\[lg]eq(?![a-zA-Z])|[<>]")
_MIRRORED = {"\\geq": "\\leq", ">": "<"}

_pool: WorkerPool | None = None
_pool_lock = threading.Lock()


def worker_pool() -> WorkerPool:
    """The shared pool of sympy workers (started lazily; up to min(4, cpus) under concurrent scoring)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = WorkerPool(("glmv_jax.rewards.math_worker",), max_workers=min(4, os.cpu_count() or 1))
        return _pool


def warm_up() -> tuple[str, ...]:
    """Start a sympy worker now instead of at the first response that needs one; the modules it warmed up."""
    return worker_pool().warm_up()


def normalize(text: str) -> str:
    """Delimiters and final period off, known unicode math to LaTeX, LaTeX spacing off, ** -> ^, one spelling
    per relation (\\le, <= -> \\leq; \\gt -> >), greater-than chains mirrored (5 \\geq x -> x \\leq 5),
    spaces collapsed."""
    text = numbers.clean(text)
    text = "".join(_UNICODE.get(char, char) for char in text)
    text = _SPACING.sub(" ", text).replace("**", "^")
    text = _RELATION_SPELLING.sub(lambda m: f" {_CANONICAL_RELATION[m[1] or m[0]]} ", text)
    return " ".join(_mirror_greater(text).split())


def _mirror_greater(text: str) -> str:
    """a > b \\geq c -> c \\leq b < a, when every order relation is > or \\geq, none is nested in brackets and
    none lacks a member ("\\geq 3" stays)."""
    relations = list(_ORDER_RELATION.finditer(text))
    if not relations or any(m[0] not in _MIRRORED or _balance(text[:m.start()]) for m in relations):
        return text
    members = [text[start:end] for start, end in zip([0] + [m.end() for m in relations],
                                                      [m.start() for m in relations] + [len(text)])]
    if not all(member.strip() for member in members):
        return text
    mirrored = [members[-1]]
    for relation, member in zip(reversed(relations), reversed(members[:-1])):
        mirrored += [_MIRRORED[relation[0]], member]
    return " ".join(mirrored)


def _balance(text: str) -> int:
    return sum(_BRACKETS.get(char, 0) for char in text)


def _depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        depth += _BRACKETS.get(char, 0)
        deepest = max(deepest, depth)
    return deepest


def hedge_markers(text: str) -> set[str]:
    """Words, relations and separators that turn one value into several or a range ("3 or 4", "< 10", "3, 4")."""
    plain = _TEXT_COMMAND.sub(lambda m: f" {m[1]} ", text)
    markers = {f"\\{name}" for name in _COMMAND.findall(plain) if name in _HEDGE_COMMANDS}
    words = _COMMAND.sub(" ", plain)
    markers |= {word.lower() for word in _HEDGE_WORDS.findall(words)}
    markers |= {symbol for symbol in _HEDGE_SYMBOLS if symbol in words}
    if re.search(r"[,;]", _THOUSANDS.sub("", words)):
        markers.add("separator")
    return markers


def reference(answer) -> str:
    """The normalised reference text; raises ValueError if it is not a string or number."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float, Fraction)):
        raise ValueError(f"math answer must be a string or a number, got {type(answer).__name__}: {answer!r}")
    text = normalize(str(answer))
    if not text:
        raise ValueError("math answer is empty")
    return text


def _guard(pred: str, reference: str, config: RewardConfig) -> str | None:
    """Why `pred` must not reach the parser, or None."""
    if len(pred) > config.math_max_chars:
        return "too_long"
    if not _ALLOWED.fullmatch(pred) or "$" in pred:
        return "bad_chars"
    if _depth(pred) > config.math_max_depth:
        return "too_deep"
    if hedge_markers(pred) - hedge_markers(reference):
        return "hedge"
    if _TOWER.search(pred) or _BIG_EXPONENT.search(pred) or _BIG_FACTORIAL.search(pred):
        return "huge_number"
    if _false_equation(pred, config.math_rel_tol):
        return "false_equation"
    return None


def _false_equation(text: str, rel_tol: float) -> bool:
    """An equation chain with plain-number members that differ ("5 = 6", "x = 5 = 6"): the parser would
    grade its last member alone. Chains like "x = 6" or "3+3 = 6" (one plain number) are left to it."""
    if "=" not in text:
        return False
    values = [v for v in map(numbers.parse_number, text.split("=")) if v is not None]
    return any(not numbers.close(v, values[-1], rel_tol) for v in values)


def score(extracted: str, reference: str, config: RewardConfig) -> tuple[float, dict]:
    """(1.0 or 0.0, info) against reference(answer); info["path"]: "string", "numeric" or "sympy"."""
    if len(extracted) > 4 * config.math_max_chars:
        return 0.0, {"reason": "too_long"}
    pred = normalize(extracted)
    if pred.replace(" ", "") == reference.replace(" ", ""):
        return 1.0, {"path": "string"}
    if reason := _guard(pred, reference, config):
        return 0.0, {"reason": reason}
    pred_value, reference_value = numbers.parse_number(pred), numbers.parse_number(reference)
    if pred_value is not None and reference_value is not None:
        return float(numbers.close(pred_value, reference_value, config.math_rel_tol)), {"path": "numeric"}
    result = worker_pool().call(EQUIVALENCE_FN, [reference, pred], config.math_time_limit_s,
                                config.math_kill_grace_s)
    if result.timed_out:
        return 0.0, {"path": "sympy", "reason": "timeout", "timeout": True, "worker_killed": result.killed}
    if result.error is not None:
        return 0.0, {"path": "sympy", "reason": "verifier_error", "error": result.error}
    info = {"path": "sympy"}
    if "reason" in result.value:
        info["reason"] = result.value["reason"]
    return float(result.value["equal"]), info
