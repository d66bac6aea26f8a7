"""choice: multiple choice about the scene; answer option letters ("B" or "A,C"). Knob: fixed vs shuffled
options, what is asked (shape, colour of a shape, every shape present: multi-select)."""
from __future__ import annotations

from .base import COLORS, SHAPES, Sample, Task, canvas, describe, draw_shape, grid_boxes, pick

KINDS = SHAPES + ("diamond",)
LETTERS = "ABCD"


def _options(options: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))


def make(rng, tier: int, size: int) -> Sample:
    scale = size / 56
    image, draw = canvas(rng, size)
    if tier <= 1:
        objects = [(pick(rng, COLORS), pick(rng, SHAPES))]
        side = round(rng.integers(20, 29) * scale)
        boxes = grid_boxes(rng, 1, size, 1, (side, side), margin=round(4 * scale))
    else:
        n = int(rng.integers(2, 4 if tier == 2 else 5))
        kinds = pick(rng, SHAPES, n) if tier == 2 else [pick(rng, KINDS) for _ in range(n)]
        objects = [(pick(rng, COLORS), k) for k in kinds]
        boxes = grid_boxes(rng, n, size, 2, (round(12 * scale), round(20 * scale)), margin=round(2 * scale))
    for (color, kind), box in zip(objects, boxes):
        draw_shape(draw, kind, box, COLORS[color])
    scene = describe(objects)
    if tier <= 1:
        options = list(SHAPES) if tier == 0 else pick(rng, SHAPES, 3)
        answer = LETTERS[options.index(objects[0][1])]
        question = f"Which shape is in the image?\n{_options(options)}"
        within = options.index(objects[0][1]) / 3
    elif tier == 2:
        color, kind = objects[int(rng.integers(len(objects)))]
        options = [color] + pick(rng, [c for c in COLORS if c != color], 3)
        options = [options[int(i)] for i in rng.permutation(4)]
        answer = LETTERS[options.index(color)]
        question = f"What color is the {kind}?\n{_options(options)}"
        within = (len(objects) - 2) / 2
    else:
        present = {k for _, k in objects}
        options = [KINDS[int(i)] for i in rng.permutation(len(KINDS))]
        answer = ",".join(LETTERS[i] for i, k in enumerate(options) if k in present)
        question = f"Which shapes are in the image? Select all that apply.\n{_options(options)}"
        within = (len(present) - 1) / 4
    return Sample(image=image, question=question, answer=answer, think=f"I see {scene}.",
                  caption=f"The image shows {scene}.", within=min(within, 0.999))


TASK = Task("choice", ("shape-fixed", "shape-shuffled", "color-of-kind", "multi-select"), make)
