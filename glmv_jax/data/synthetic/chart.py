"""chart: read bar values. Knob: number of bars, value range, unit gridlines vs tick labels, what is asked
(tier 0: the largest of 2 bars on a 1-5 unit grid; tier 3: a difference read off labelled ticks)."""
from __future__ import annotations

from .base import COLORS, Sample, Task, canvas, draw_text, pick, text_extent

# tier -> bars, values (lo, hi, step), axis maximum, gridline step (None: tick labels every `tick`)
_TIERS = {
    0: dict(bars=2, values=(1, 5, 1), top=5, grid=1),
    1: dict(bars=3, values=(1, 9, 1), top=9, grid=1),
    2: dict(bars=4, values=(5, 50, 5), top=50, tick=10),
    3: dict(bars=5, values=(10, 100, 5), top=100, tick=20),
}
AXIS, GRID = (60, 60, 60), (205, 205, 205)


def _draw(rng, size, spec, colors, values):
    scale = size / 56
    image, draw = canvas(rng, size)
    left = round((14 if "tick" in spec else 5) * scale)
    bottom, top, right = size - round(4 * scale), round(4 * scale), size - round(3 * scale)
    unit = (bottom - top) / spec["top"]
    step = spec.get("grid") or spec["tick"]
    for v in range(step, spec["top"] + 1, step):
        y = round(bottom - v * unit)
        draw.line([(left, y), (right, y)], fill=GRID)
        if "tick" in spec:
            px = round(7 * scale)  # right-aligned tick label
            draw_text(image, (left - 2 - text_extent(str(v), px)[2], y), str(v), px, AXIS)
    slot = (right - left) / len(values)
    for i, (color, v) in enumerate(zip(colors, values)):
        x0 = round(left + i * slot + slot * 0.2)
        x1 = round(left + (i + 1) * slot - slot * 0.2)
        draw.rectangle([x0, round(bottom - v * unit), x1, bottom], fill=COLORS[color])
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS)
    return image


def make(rng, tier: int, size: int) -> Sample:
    spec = _TIERS[tier]
    lo, hi, step = spec["values"]
    colors = pick(rng, COLORS, spec["bars"])
    values = [int(v) for v in rng.integers(lo // step, hi // step + 1, spec["bars"]) * step]
    image = _draw(rng, size, spec, colors, values)
    listing = ", ".join(f"{c} {v}" for c, v in zip(colors, values))
    if tier == 0:
        answer, question = max(values), "What is the largest value in the bar chart?"
        think = f"The bars are {listing}; the largest is {answer}."
    elif tier in (1, 2):
        i = int(rng.integers(len(values)))
        answer, question = values[i], f"What is the value of the {colors[i]} bar?"
        think = f"The {colors[i]} bar reaches {answer}."
    else:
        i, j = pick(rng, range(len(values)), 2)
        if values[i] < values[j]:
            i, j = j, i
        answer = values[i] - values[j]
        question = f"How much larger is the {colors[i]} bar than the {colors[j]} bar?"
        think = f"{colors[i]} {values[i]}, {colors[j]} {values[j]}, difference {answer}."
    return Sample(image=image, question=question, answer=answer, think=think,
                  caption=f"A bar chart: {listing}.", within=min((max(values) - lo) / (hi - lo + step), 0.999))


TASK = Task("chart", ("two-bars-max", "named-bar", "ticks", "difference"), make)
