"""Shared pieces of the built-in task suite: per-record RNG streams, the sample type, canvases with a faint
noise background (so no two images coincide), shapes, fonts, box maths on the 0-1000 grid, descriptions."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SPLITS = ("train", "rl", "heldout", "probe")   # SFT records, RL prompts, held-out evaluation, the RL
                                                # stage's reward-health probe (rl/health.py): disjoint streams
COLORS = {  # name -> RGB, far apart so a 2-layer ViT can tell them apart
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215),
    "orange": (240, 145, 25), "purple": (135, 55, 185),
}
SHAPES = ("circle", "square", "triangle")
NOISE = 6  # background noise amplitude (uint8 levels) around the background value


@dataclass
class Sample:
    """One rendered task instance.

    image: the PIL RGB image. question: user text (without the image marker). answer: the domain's answer
    (docs/data.md section 8). think: a short reasoning trace. prefix: text before the box in the SFT answer. caption: a
    pretraining caption of the image. within: the task knob inside its tier, in [0, 1).
    """
    image: Image.Image
    question: str
    answer: Any
    think: str
    caption: str
    within: float = 0.0
    prefix: str = ""


@dataclass(frozen=True)
class Task:
    """A domain: `make(rng, tier, size) -> Sample` and its tier names (easy first)."""
    domain: str
    tiers: tuple[str, ...]
    make: Callable[[np.random.Generator, int, int], Sample]


def record_rng(seed: int, split: str, domain: str, index: int) -> np.random.Generator:
    """An independent stream per (seed, split, domain, index): train and held-out never share a stream."""
    key = f"glmv-suite|{int(seed)}|{split}|{domain}|{int(index)}".encode()
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:16], "little"))


def canvas(rng: np.random.Generator, size: int, base: int = 246) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A near-white RGB canvas with +-NOISE grey per-pixel noise (base + NOISE <= 255)."""
    noise = rng.integers(base - NOISE, base + NOISE + 1, (size, size), dtype=np.uint8)
    image = Image.fromarray(noise, "L").convert("RGB")
    return image, ImageDraw.Draw(image)


@lru_cache(maxsize=64)
def font(px: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font at `px` pixels (no system fonts needed)."""
    return ImageFont.load_default(max(int(px), 6))


@lru_cache(maxsize=8192)
def _text_mask(text: str, px: int) -> tuple[Image.Image, int, int]:
    """(antialiased 'L' mask of `text`, left, top offsets of the mask from the text centre)."""
    left, top, right, bottom = font(px).getbbox(text, anchor="mm")
    mask = Image.new("L", (max(right - left, 1), max(bottom - top, 1)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, font=font(px), fill=255, anchor="mm")
    return mask, left, top


def text_extent(text: str, px: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of `text` drawn centred at (0, 0)."""
    mask, left, top = _text_mask(text, px)
    return left, top, left + mask.width, top + mask.height


def draw_text(image: Image.Image, center: tuple[float, float], text: str, px: int, color) -> None:
    """Draw `text` centred at `center` (rounded to pixels); glyph masks are cached, so repeats are cheap."""
    mask, left, top = _text_mask(text, int(px))
    image.paste(tuple(color), (round(center[0]) + left, round(center[1]) + top), mask)


def random_center(rng: np.random.Generator, text: str, px: int, size: int) -> tuple[float, float]:
    """A uniformly random centre that keeps `text` inside the image (it must fit)."""
    left, top, right, bottom = text_extent(text, px)
    if right - left > size or bottom - top > size:
        raise ValueError(f"text {text!r} at {px} px does not fit a {size} px image")
    return float(rng.uniform(-left, size - right)), float(rng.uniform(-top, size - bottom))


def fitting_px(text: str, px: int, size: int, margin: int = 2) -> int:
    """The largest font size <= px at which `text` fits inside the image with `margin` pixels to spare."""
    while px > 6:
        left, top, right, bottom = text_extent(text, px)
        if right - left <= size - 2 * margin and bottom - top <= size - 2 * margin:
            break
        px -= 1
    return px


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], color) -> None:
    """Fill `kind` inside the inclusive pixel box (x0, y0, x1, y1); the shape touches all four sides."""
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)
    elif kind == "diamond":
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=color)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def grid_boxes(rng: np.random.Generator, n: int, size: int, cells: int, extent: tuple[int, int],
               margin: int = 1) -> list[tuple[int, int, int, int]]:
    """`n` non-overlapping inclusive pixel boxes: distinct cells of a cells x cells grid, each box a random
    side in `extent` (clipped to the cell) at a random offset inside its cell."""
    if n > cells * cells:
        raise ValueError(f"{n} objects do not fit a {cells}x{cells} grid")
    cell = size // cells
    boxes = []
    for c in rng.choice(cells * cells, size=n, replace=False):
        row, col = divmod(int(c), cells)
        side = int(min(rng.integers(extent[0], extent[1] + 1), cell - 2 * margin))
        x0 = col * cell + margin + int(rng.integers(0, cell - 2 * margin - side + 1))
        y0 = row * cell + margin + int(rng.integers(0, cell - 2 * margin - side + 1))
        boxes.append((x0, y0, x0 + side - 1, y0 + side - 1))
    return boxes


def to_grid(box: tuple[int, int, int, int], size: int) -> list[int]:
    """Inclusive pixel box -> [x1, y1, x2, y2] on the 0-1000 grid (edges at pixel boundaries)."""
    x0, y0, x1, y1 = box
    return [round(v * 1000 / size) for v in (x0, y0, x1 + 1, y1 + 1)]


def where(box: tuple[int, int, int, int], size: int) -> str:
    """'top left' ... 'bottom right' from the box centre on a 3x3 split."""
    cx, cy = (box[0] + box[2] + 1) / 2 / size, (box[1] + box[3] + 1) / 2 / size
    row = ("top", "middle", "bottom")[min(int(cy * 3), 2)]
    col = ("left", "center", "right")[min(int(cx * 3), 2)]
    return "center" if (row, col) == ("middle", "center") else f"{row} {col}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def describe(objects: list[tuple[str, str]]) -> str:
    """[(colour, kind), ...] -> '2 red circles, 1 blue square' (first-seen order)."""
    counts: dict[tuple[str, str], int] = {}
    for obj in objects:
        counts[obj] = counts.get(obj, 0) + 1
    return ", ".join(plural(n, f"{color} {kind}") for (color, kind), n in counts.items())


def pick(rng: np.random.Generator, options, k: int | None = None):
    """One element (k None) or k distinct elements of a sequence, as Python values."""
    seq = list(options)
    if k is None:
        return seq[int(rng.integers(len(seq)))]
    return [seq[int(i)] for i in rng.choice(len(seq), size=k, replace=False)]


def answer_text(domain: str, answer: Any) -> str:
    """The text that goes inside the response box for `answer` (compact JSON for boxes and actions)."""
    if domain in ("grounding", "gui"):
        return json.dumps(answer, separators=(",", ":"))
    if isinstance(answer, float):
        return f"{answer:g}"
    return str(answer)
