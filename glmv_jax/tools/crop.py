"""crop: a region of an episode image, enlarged for reading.

The box is [x1, y1, x2, y2] on the 0-1000 grid of the grounding boxes (rewards/boxes.py: each coordinate is
the fraction of the image width / height times 1000, whatever the image's pixel size, so the model uses
the coordinates it grounds with). The region is cut at whole pixels (outward) and scaled up, keeping its
aspect, until its shorter side reaches MIN_SIDE, by at most MAX_SCALE and with the longer side at most
MAX_SIDE; a region already that large is returned as cut. `image` picks the episode image (default 0).
"""
from __future__ import annotations

import math

from PIL import Image

from glmv_jax.rewards.boxes import GRID
from glmv_jax.tools.base import Tool, ToolInputError

MIN_SIDE, MAX_SIDE, MAX_SCALE = 448, 1344, 4.0


def pixel_box(box, width: int, height: int) -> tuple[int, int, int, int]:
    """Grid box -> (left, top, right, bottom) pixels; ToolInputError if it leaves the grid or holds no pixel."""
    x1, y1, x2, y2 = box
    if not all(0 <= v <= GRID for v in box):
        raise ToolInputError("box_outside_image", f"box {list(box)} leaves the image: coordinates are on the "
                                                  f"0-{GRID} grid")
    left, top = math.floor(x1 * width / GRID), math.floor(y1 * height / GRID)
    right, bottom = math.ceil(x2 * width / GRID), math.ceil(y2 * height / GRID)
    if x1 >= x2 or y1 >= y2 or right <= left or bottom <= top:
        raise ToolInputError("empty_box", f"box {list(box)} is empty: it needs x1 < x2 and y1 < y2")
    return left, top, right, bottom


def enlarge(image: Image.Image) -> Image.Image:
    w, h = image.size
    scale = min(MIN_SIDE / min(w, h), MAX_SCALE, MAX_SIDE / max(w, h))
    if scale <= 1:
        return image
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)


def run(arguments: dict, images) -> Image.Image:
    index = int(arguments.get("image", 0))
    if not 0 <= index < len(images):
        raise ToolInputError("no_such_image", f"image {index} does not exist; the episode has {len(images)}")
    image = images[index]
    return enlarge(image.crop(pixel_box(arguments["box"], *image.size)))


TOOL = Tool(
    name="crop",
    description=f"Crop a region of an image and zoom in. box: [x1, y1, x2, y2] on the 0-{GRID} grid (fractions of "
                f"the width and height times {GRID}); image: which image, 0 = the first.",
    parameters={"type": "object", "properties": {
        "box": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
        "image": {"type": "integer", "minimum": 0}},
        "required": ["box"], "additionalProperties": False},
    fn=run,
    time_limit_s=2.0,
)
