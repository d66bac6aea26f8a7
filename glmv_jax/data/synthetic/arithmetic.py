"""math: an arithmetic expression written in the image; answer its value. Knob: operand digits, operators,
font size and placement (tier 0: one-digit sums in a big fixed font at a fixed place)."""
from __future__ import annotations

from fractions import Fraction

from .base import COLORS, Sample, Task, canvas, draw_text, fitting_px, pick, random_center

QUESTION = "What is the value of the expression in the image?"


def _expression(rng, tier: int) -> tuple[str, Fraction, float]:
    """(expression text, exact value, knob in [0, 1))."""
    if tier == 0:
        a, b = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        return f"{a}+{b}", Fraction(a + b), (a + b - 2) / 7
    if tier == 1:
        a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
        if rng.random() < 0.5:
            return f"{a}+{b}", Fraction(a + b), (a + b) / 19
        a, b = max(a, b), min(a, b)
        return f"{a}-{b}", Fraction(a - b), 0.5 + (a - b) / 20
    if tier == 2:
        op = pick(rng, "+-*")
        if op == "*":
            a, b = int(rng.integers(10, 100)), int(rng.integers(2, 10))
            return f"{a}*{b}", Fraction(a * b), 0.67 + a / 300
        a, b = int(rng.integers(10, 100)), int(rng.integers(10, 100))
        if op == "-":
            a, b = max(a, b), min(a, b)
            return f"{a}-{b}", Fraction(a - b), 0.33 + (a - b) / 300
        return f"{a}+{b}", Fraction(a + b), (a + b) / 600
    if rng.random() < 0.5:  # tier 3
        a, b, c = int(rng.integers(2, 13)), int(rng.integers(2, 13)), int(rng.integers(1, 21))
        return f"{a}*{b}-{c}", Fraction(a * b - c), a * b / 300
    b = int(rng.integers(2, 10))
    a = int(rng.integers(1, 21))
    while a % b == 0:
        a += 1
    return f"{a}/{b}", Fraction(a, b), 0.5 + a / 42


def _format(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def make(rng, tier: int, size: int) -> Sample:
    text, value, within = _expression(rng, tier)
    scale = size / 56
    image, _ = canvas(rng, size)
    if tier == 0:
        px, color, center = round(22 * scale), (0, 0, 0), (size / 2, size / 2)
    else:
        px = fitting_px(text, round(scale * int(rng.integers(*((17, 23), (13, 16), (11, 13))[tier - 1]))), size)
        color = COLORS[pick(rng, COLORS)] if tier >= 2 else (0, 0, 0)
        center = random_center(rng, text, px, size)
    draw_text(image, center, text, px, color)
    answer = _format(value)
    return Sample(image=image, question=QUESTION, answer=answer, think=f"{text}={answer}",
                  caption=f"The expression {text} written in the image.", within=min(within, 0.999))


TASK = Task("math", ("one-digit-sum-big", "one-digit", "two-digit", "mixed-ops"), make)
