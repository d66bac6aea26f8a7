"""ocr: read the rendered text. Knob: length (1 digit ... 8 characters), font size, placement, colour."""
from __future__ import annotations

from .base import COLORS, Sample, Task, canvas, draw_text, fitting_px, pick, random_center

QUESTION = "What text is written in the image?"
SHORT_WORDS = ("cat", "dog", "sun", "red", "box", "map", "pen", "cup", "hat", "key", "bus", "car", "fox", "owl",
               "tree", "book", "fish", "star", "moon", "rain", "ship", "door", "lamp", "bird", "cake", "milk")
LONG_WORDS = ("window", "button", "garden", "planet", "rocket", "yellow", "silver", "forest", "bridge", "candle",
              "orange", "mirror", "castle", "pocket", "jungle", "violin")
_ALNUM = "abcdefghijkmnpqrstuvwxyz23456789"


def _text(rng, tier: int) -> tuple[str, float]:
    if tier == 0:
        d = int(rng.integers(0, 10))
        return str(d), d / 10
    if tier == 1:
        v = int(rng.integers(10, 100))
        return str(v), (v - 10) / 90
    if tier == 2:
        word = pick(rng, SHORT_WORDS)
        return word, (len(word) - 3) / 2
    if rng.random() < 0.5:
        word = pick(rng, LONG_WORDS)
        return word, 0.0
    n = int(rng.integers(5, 8))
    return "".join(pick(rng, _ALNUM) for _ in range(n)), 0.5 + (n - 5) / 6


def make(rng, tier: int, size: int) -> Sample:
    text, within = _text(rng, tier)
    scale = size / 56
    image, _ = canvas(rng, size)
    if tier == 0:
        px, color, center = round(30 * scale), (0, 0, 0), (size / 2, size / 2)
    else:
        px = fitting_px(text, round(scale * int(rng.integers(*((22, 27), (16, 21), (11, 14))[tier - 1]))), size)
        color = COLORS[pick(rng, COLORS)] if tier >= 2 else (0, 0, 0)
        center = random_center(rng, text, px, size)
    draw_text(image, center, text, px, color)
    return Sample(image=image, question=QUESTION, answer=text, think=f"The text reads {text}.",
                  caption=f"The text {text} written in the image.", within=min(within, 0.999))


TASK = Task("ocr", ("digit-big", "two-digits", "short-word", "long-text"), make)
