"""Boxes [x1, y1, x2, y2] on the 0-1000 grid: parsing from model text, validation, IoU, one-to-one matching.

Box text may use any of the bracket styles GLM-V writes ([], [[ ]], (), <>; GLM-V README, grounding): a box is
four numbers inside one matching pair of (), [] or <>, and square brackets may also group boxes.
"""
from __future__ import annotations

import re

import numpy as np
from scipy.optimize import linear_sum_assignment

GRID = 1000
_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_PAIRS = {"[": "]", "(": ")", "<": ">"}
_BOX = re.compile(r"([\[(<])" + ",".join([_NUMBER] * 4) + r"([\])>])")
_FILLER = re.compile(r"[\s,\[\]]*")


def is_valid(box, grid: float = GRID) -> bool:
    """Four finite numbers with 0 <= x1 < x2 <= grid and 0 <= y1 < y2 <= grid."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return False
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in box):
        return False
    x1, y1, x2, y2 = box
    return 0 <= x1 < x2 <= grid and 0 <= y1 < y2 <= grid


def parse_boxes(text: str, max_boxes: int) -> list[list[float]] | None:
    """Every box in `text`, if the text is nothing but boxes joined by commas, square brackets and whitespace
    ("[1,2,3,4]", "[[1,2,3,4], [5,6,7,8]]", "(1,2,3,4)", "<1,2,3,4>"); None if anything else is there, a box's
    brackets do not match ("(1,2,3,4]"), or there are more than max_boxes."""
    boxes = []
    position = 0
    for match in _BOX.finditer(text):
        if not _FILLER.fullmatch(text, position, match.start()) or _PAIRS[match[1]] != match[6]:
            return None
        boxes.append([float(v) for v in match.groups()[1:5]])
        if len(boxes) > max_boxes:
            return None
        position = match.end()
    if not boxes or not _FILLER.fullmatch(text, position):
        return None
    return boxes


def iou(a, b) -> float:
    """Intersection over union of two valid boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def count_matches(predicted: list, reference: list, threshold: float) -> int:
    """Size of the largest one-to-one matching of boxes with IoU >= threshold (invalid predictions match nothing)."""
    if not predicted or not reference:
        return 0
    hits = np.array([[is_valid(p) and iou(p, r) >= threshold for r in reference] for p in predicted], float)
    rows, cols = linear_sum_assignment(hits, maximize=True)
    return int(hits[rows, cols].sum())
