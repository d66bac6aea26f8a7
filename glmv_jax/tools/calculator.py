"""calculator: arithmetic on numbers with + - * / // % **, parentheses and unary signs.

The expression is parsed with `ast` and only those nodes are evaluated (nothing is eval()'d): names,
calls, attributes, comparisons, bit operators (write powers as **, not ^) are refused. Limits: at most
MAX_CHARS characters, exponents |e| <= MAX_EXPONENT, every intermediate and the result |x| <= MAX_MAGNITUDE
(powers are checked before they are computed). Integers stay exact; `/` gives a float; floats print with 12
significant digits.
"""
from __future__ import annotations

import ast
import math
import operator

from glmv_jax.tools.base import Tool, ToolInputError

MAX_CHARS = 200
MAX_EXPONENT = 100
MAX_MAGNITUDE = 1e100
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; ToolInputError for anything else or past the limits."""
    if len(expression) > MAX_CHARS:
        raise ToolInputError("expression_too_long", f"the expression has {len(expression)} characters; at most "
                                                    f"{MAX_CHARS}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ToolInputError("not_arithmetic", f"not an arithmetic expression: {expression!r}") from None
    return _eval(tree.body)


def _eval(node) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolInputError("division_by_zero", "division by zero") from None
        except OverflowError:
            raise ToolInputError("result_too_large", f"a value exceeds {MAX_MAGNITUDE:g}") from None
        if isinstance(value, complex):
            raise ToolInputError("not_real", f"{left!r} ** {right!r} is not a real number")
        return _bounded(value)
    raise ToolInputError("not_arithmetic", f"only numbers, + - * / // % **, parentheses and signs are allowed, "
                                           f"got {type(node).__name__}")


def _check_power(base, exponent) -> None:
    if abs(exponent) > MAX_EXPONENT:
        raise ToolInputError("exponent_too_large", f"exponent {exponent!r} exceeds {MAX_EXPONENT}")
    if base != 0 and exponent > 0 and math.log10(abs(base)) * exponent > math.log10(MAX_MAGNITUDE):
        raise ToolInputError("result_too_large", f"{base!r} ** {exponent!r} exceeds {MAX_MAGNITUDE:g}")


def _bounded(value):
    if math.isnan(value) or abs(value) > MAX_MAGNITUDE:
        raise ToolInputError("result_too_large", f"a value exceeds {MAX_MAGNITUDE:g}")
    return value


def format_number(value: int | float) -> str:
    return str(value) if isinstance(value, int) else format(value, ".12g")


def run(arguments: dict, images) -> str:
    return format_number(evaluate(arguments["expression"]))


TOOL = Tool(
    name="calculator",
    description="Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses.",
    parameters={"type": "object",
                "properties": {"expression": {"type": "string", "description": "e.g. (12.5 + 3) * 4 / 2"}},
                "required": ["expression"], "additionalProperties": False},
    fn=run,
    time_limit_s=1.0,
)
