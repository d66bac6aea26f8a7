"""GUI agent, single step: the box holds one JSON action, e.g. {"action": "click", "box": [x1, y1, x2, y2]}
or {"action": "type", "text": "hello"}.

1 iff the prediction is one JSON object with exactly the reference's keys and every key matches: "box" by
IoU >= threshold (0-1000 grid), "text" after whitespace collapsing (case kept), anything else exactly.
A list of actions, extra or missing keys, a key given twice (at any depth), or unparsable JSON score 0.
"""
from __future__ import annotations

import json

from glmv_jax.rewards import boxes
from glmv_jax.rewards.result import RewardConfig

MAX_ACTION_CHARS = 4096


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice: json.loads would silently keep the last value."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    value = {}
    for key, item in pairs:
        if key in value:
            raise DuplicateKeyError(f"duplicate key {key!r}")
        value[key] = item
    return value


def _loads(text: str):
    return json.loads(text, object_pairs_hook=_unique_keys)


def reference(answer) -> dict:
    value = answer
    if isinstance(answer, str):
        try:
            value = _loads(answer)
        except DuplicateKeyError as error:
            raise ValueError(f"gui answer has a {error}: {answer!r}") from None
        except ValueError:
            raise ValueError(f"gui answer is not a JSON action: {answer!r}") from None
    if not isinstance(value, dict) or not isinstance(value.get("action"), str):
        raise ValueError(f"gui answer must be a dict with an 'action' string, got {answer!r}")
    if "box" in value and not boxes.is_valid(value["box"]):
        raise ValueError(f"gui answer box must be [x1, y1, x2, y2] on the 0-1000 grid, got {value['box']!r}")
    if "text" in value and not isinstance(value["text"], str):
        raise ValueError(f"gui answer text must be a string, got {value['text']!r}")
    return value


def _text(value: str) -> str:
    return " ".join(value.split())


def _key_matches(key: str, pred, reference, config: RewardConfig) -> bool:
    if key == "box":
        return boxes.is_valid(pred) and boxes.iou(pred, reference) >= config.iou_threshold
    if key == "text":
        return isinstance(pred, str) and _text(pred) == _text(reference)
    return type(pred) is type(reference) and pred == reference


def score(extracted: str, reference: dict, config: RewardConfig) -> tuple[float, dict]:
    if len(extracted) > MAX_ACTION_CHARS:
        return 0.0, {"reason": "too_long"}
    try:
        action = _loads(extracted)
    except DuplicateKeyError:
        return 0.0, {"reason": "duplicate_key"}
    except (ValueError, RecursionError):
        return 0.0, {"reason": "not_json"}
    if not isinstance(action, dict):
        return 0.0, {"reason": "not_one_action"}
    if set(action) != set(reference):
        return 0.0, {"reason": "keys_differ"}
    failed = [k for k in reference if not _key_matches(k, action[k], reference[k], config)]
    return float(not failed), ({"mismatch": failed} if failed else {})
