"""Grounding: predicted boxes vs reference boxes, one-to-one at IoU >= threshold (0.5).

reward = matched / max(#predicted, #reference): spraying boxes earns nothing, and missing ones cost.
Both the reference text and the predicted box text may use any bracket style of boxes.parse_boxes.
"""
from __future__ import annotations

import sys

from glmv_jax.rewards import boxes
from glmv_jax.rewards.result import RewardConfig


def reference(answer) -> list[list[float]]:
    """The reference as a list of valid boxes; accepts one box, a list of boxes, or their text in any bracket
    style ("[[1, 2, 3, 4]]", "(1,2,3,4)", "<1,2,3,4>")."""
    value = answer
    if isinstance(answer, str):
        value = boxes.parse_boxes(answer, sys.maxsize)
        if value is None:
            raise ValueError(f"grounding answer is not boxes: {answer!r}")
    if isinstance(value, (list, tuple)) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(boxes.is_valid(b) for b in value):
        raise ValueError(f"grounding answer must be boxes [x1, y1, x2, y2] with 0 <= x1 < x2 <= 1000, "
                         f"0 <= y1 < y2 <= 1000, got {answer!r}")
    return [list(b) for b in value]


def score(extracted: str, reference: list, config: RewardConfig) -> tuple[float, dict]:
    predicted = boxes.parse_boxes(extracted, config.max_boxes)
    if predicted is None:
        return 0.0, {"reason": "not_boxes"}
    matched = boxes.count_matches(predicted, reference, config.iou_threshold)
    return matched / max(len(predicted), len(reference)), {"matched": matched, "predicted": len(predicted)}
