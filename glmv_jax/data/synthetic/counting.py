"""counting: how many shapes (or how many of a named kind). Knob: number of objects, their size, distractors."""
from __future__ import annotations

from .base import COLORS, SHAPES, Sample, Task, canvas, describe, draw_shape, grid_boxes, pick, plural

# tier -> (count range, cells, side range at 56 px, question kind)
_TIERS = {
    0: dict(counts=(1, 3), cells=3, side=(12, 15), ask="all", one_kind=True),
    1: dict(counts=(1, 5), cells=3, side=(10, 14), ask="all", one_kind=False),
    2: dict(counts=(2, 7), cells=3, side=(9, 13), ask="kind", one_kind=False),
    3: dict(counts=(6, 12), cells=4, side=(6, 10), ask="color_kind", one_kind=False),
}


def make(rng, tier: int, size: int) -> Sample:
    spec = _TIERS[tier]
    lo, hi = spec["counts"]
    n = int(rng.integers(lo, hi + 1))
    scale = size / 56
    image, draw = canvas(rng, size)
    boxes = grid_boxes(rng, n, size, spec["cells"], (round(spec["side"][0] * scale), round(spec["side"][1] * scale)))
    if spec["one_kind"]:
        kind, color = pick(rng, SHAPES), pick(rng, COLORS)
        objects = [(color, kind)] * n
    else:
        objects = [(pick(rng, COLORS), pick(rng, SHAPES)) for _ in range(n)]
    for (color, kind), box in zip(objects, boxes):
        draw_shape(draw, kind, box, COLORS[color])
    scene = describe(objects)
    if spec["ask"] == "all":
        count, question = n, "How many shapes are in the image?"
    elif spec["ask"] == "kind":
        kind = pick(rng, SHAPES)
        count, question = sum(k == kind for _, k in objects), f"How many {kind}s are in the image?"
    else:
        color, kind = objects[int(rng.integers(n))]  # the asked group is present at least once
        count = sum(o == (color, kind) for o in objects)
        question = f"How many {color} {kind}s are in the image?"
    think = f"I see {scene}." if spec["ask"] == "all" else f"I see {scene}, so {count}."
    return Sample(image=image, question=question, answer=count, think=think,
                  caption=f"{plural(n, 'shape')}: {scene}.", within=(n - lo) / (hi - lo + 1))


TASK = Task("counting", ("few-big", "few-mixed", "named-kind", "many-small"), make)
