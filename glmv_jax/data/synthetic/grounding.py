"""grounding: box the described shape(s) on the 0-1000 grid. Knob: free vs grid-snapped placement, size,
distractors, several targets (tier 0: one shape filling one of the 9 cells of a 3x3 grid, the same split
the think trace names: "top left" ... "bottom right")."""
from __future__ import annotations

from .base import COLORS, SHAPES, Sample, Task, canvas, draw_shape, grid_boxes, pick, to_grid, where


def _scene(rng, tier: int, size: int):
    """(objects [(colour, kind)], inclusive pixel boxes, indices of the targets, knob)."""
    scale = size / 56
    if tier == 0:
        cell = size // 3
        row, col = divmod(int(rng.integers(9)), 3)
        box = (col * cell + 1, row * cell + 1, (col + 1) * cell - 2, (row + 1) * cell - 2)
        return [(pick(rng, COLORS), pick(rng, SHAPES))], [box], [0], (row * 3 + col) / 9
    if tier == 1:
        side = int(rng.integers(round(10 * scale), round(19 * scale)))
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        return [(pick(rng, COLORS), pick(rng, SHAPES))], [box], [0], 1 - (side - 10 * scale) / (9 * scale)
    if tier == 2:
        n = int(rng.integers(2, 5))
        boxes = grid_boxes(rng, n, size, 3, (round(8 * scale), round(16 * scale)))
        target = (pick(rng, COLORS), pick(rng, SHAPES))
        objects = [target]
        while len(objects) < n:  # distractors share the colour or the kind, never both
            other = (pick(rng, COLORS), target[1]) if rng.random() < 0.5 else (target[0], pick(rng, SHAPES))
            if other != target:
                objects.append(other)
        return objects, boxes, [0], (n - 2) / 3
    n = int(rng.integers(2, 6))
    boxes = grid_boxes(rng, n, size, 4, (round(6 * scale), round(11 * scale)))
    color = pick(rng, COLORS)
    n_targets = int(rng.integers(1, min(3, n - 1) + 1))
    others = [c for c in COLORS if c != color]
    objects = [(color if i < n_targets else pick(rng, others), pick(rng, SHAPES)) for i in range(n)]
    return objects, boxes, list(range(n_targets)), (n - 2) / 4


def make(rng, tier: int, size: int) -> Sample:
    objects, boxes, targets, within = _scene(rng, tier, size)
    image, draw = canvas(rng, size)
    for (color, kind), box in zip(objects, boxes):
        draw_shape(draw, kind, box, COLORS[color])
    answer = sorted(to_grid(boxes[i], size) for i in targets)
    if tier < 3:
        color, kind = objects[0]
        question = f"Give the bounding box of the {color} {kind}."
        think = f"The {color} {kind} is at the {where(boxes[0], size)}."
    else:
        color = objects[0][0]
        question = f"Give the bounding boxes of all {color} shapes."
        spots = ", ".join(f"{objects[i][1]} at the {where(boxes[i], size)}" for i in targets)
        think = f"The {color} shapes: {spots}."
    caption = ", ".join(f"a {c} {k} at the {where(b, size)}" for (c, k), b in zip(objects, boxes))
    return Sample(image=image, question=question, answer=answer, think=think,
                  caption=caption[0].upper() + caption[1:] + ".", within=min(max(within, 0.0), 0.999))


TASK = Task("grounding", ("one-shape-grid", "one-shape-free", "distractors", "all-of-color"), make)
