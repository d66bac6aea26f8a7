"""gui: click a named button in a drawn window; answer {"action": "click", "box": [x1, y1, x2, y2]} (0-1000).
Knob: number of buttons, named by colour (no reading) or by label (reading), slot layout, label size."""
from __future__ import annotations

from .base import COLORS, Sample, Task, canvas, draw_text, pick, text_extent, to_grid, where

LABELS = ("OK", "Save", "Open", "Exit", "Next", "Back", "Help", "Undo")
TITLE_BAR, BODY, BORDER, GRAY_BUTTON = (50, 70, 120), (228, 228, 232), (40, 40, 40), (175, 175, 180)
# tier -> (buttons range, slot grid rows x cols, named by)
_TIERS = {
    0: dict(buttons=(1, 1), grid=(2, 2), by="label"),
    1: dict(buttons=(2, 3), grid=(2, 2), by="color"),
    2: dict(buttons=(2, 3), grid=(2, 2), by="label"),
    3: dict(buttons=(4, 6), grid=(3, 2), by="label"),
}


def _slots(size: int, rows: int, cols: int):
    """Inclusive pixel boxes of the button slots inside the window body (below the title bar)."""
    scale = size / 56
    top, pad = round(10 * scale), round(3 * scale)
    cell_w, cell_h = (size - pad) / cols, (size - top - pad) / rows
    boxes = []
    for r in range(rows):
        for c in range(cols):
            x0, y0 = round(pad + c * cell_w), round(top + r * cell_h)
            boxes.append((x0, y0, round(pad + (c + 1) * cell_w) - pad - 1, round(top + (r + 1) * cell_h) - pad - 1))
    return boxes


def make(rng, tier: int, size: int) -> Sample:
    spec = _TIERS[tier]
    n = int(rng.integers(spec["buttons"][0], spec["buttons"][1] + 1))
    rows, cols = spec["grid"]
    slots = [_slots(size, rows, cols)[int(i)] for i in rng.choice(rows * cols, size=n, replace=False)]
    labels = pick(rng, LABELS, n)
    colors = pick(rng, COLORS, n) if spec["by"] == "color" else [None] * n
    image, draw = canvas(rng, size, base=BODY[0])
    draw.rectangle([0, 0, size - 1, round(7 * size / 56)], fill=TITLE_BAR)
    label_px = round((8 if tier == 3 else 10) * size / 56)
    for label, color, box in zip(labels, colors, slots):
        draw.rectangle(box, fill=COLORS[color] if color else GRAY_BUTTON, outline=BORDER)
        center = ((box[0] + box[2] + 1) / 2, (box[1] + box[3] + 1) / 2)
        px = label_px
        while px > 6 and text_extent(label, px)[2] - text_extent(label, px)[0] > box[2] - box[0] - 2:
            px -= 1  # shrink the label to fit its button
        draw_text(image, center, label, px, (255, 255, 255) if color else (0, 0, 0))
    target = int(rng.integers(n))
    name = f"{colors[target]} button" if spec["by"] == "color" else f"{labels[target]} button"
    answer = {"action": "click", "box": to_grid(slots[target], size)}
    buttons = ", ".join(f"{c + ' ' if c else ''}{lab}" for lab, c in zip(labels, colors))
    return Sample(image=image, question=f"Click the {name}.", answer=answer,
                  think=f"The {name} is at the {where(slots[target], size)}.",
                  caption=f"A window with buttons: {buttons}.", within=min((n - 1) / 6 + target / 12, 0.999))


TASK = Task("gui", ("single-button", "color-buttons", "labelled", "many-labelled"), make)
