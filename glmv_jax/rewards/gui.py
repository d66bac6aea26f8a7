"""GUI agent, single step: the box holds one JSON action, in either of two forms:

  ours           {"action": "click", "box": [x1, y1, x2, y2]}, {"action": "type", "text": "hello"}
  Android-World  {"action_type": "click", "box_2d": [[x1, y1, x2, y2]]} (GLM-V's glmv_reward, 0-999 grid)

Reference and prediction may each be in either form: both are read as ours (action_type -> action,
box_2d's one box -> box; a dict mixing the forms' keys scores 0). The record declares its coordinate grid
in the answer, `"grid": 999` or `1000` (default 999 for an Android-World answer, else 1000); boxes of the
reference and the prediction must lie on it.

1 iff the prediction is one JSON object with exactly the reference's keys and every key matches: "box" by
IoU >= threshold, "text" after whitespace collapsing (case kept), anything else exactly. A list of
actions, extra or missing keys, a key given twice (at any depth), or unparsable JSON score 0 (GLM-V's own
scorer multiplies IoU and text-overlap scores instead; the rule here stays ours).
"""
from __future__ import annotations

import json

from glmv_jax.rewards import boxes
from glmv_jax.rewards.result import RewardConfig

MAX_ACTION_CHARS = 4096
ANDROID_WORLD_GRID = 999
_ANDROID_WORLD = {"action_type": "action", "box_2d": "box"}


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


def as_ours(action: dict) -> dict | None:
    """The action in our form; None if it mixes the two forms' keys. A box_2d that is not a list holding
    one box becomes box None (no box)."""
    if not any(key in action for key in _ANDROID_WORLD):
        return action
    if any(key in action for key in _ANDROID_WORLD.values()):
        return None
    out = {_ANDROID_WORLD.get(key, key): value for key, value in action.items()}
    if "box" in out:
        one = isinstance(out["box"], list) and len(out["box"]) == 1 and isinstance(out["box"][0], list)
        out["box"] = out["box"][0] if one else None
    return out


def reference(answer) -> tuple[dict, float]:
    """(the action in our form, the record's grid)."""
    value = answer
    if isinstance(answer, str):
        try:
            value = _loads(answer)
        except DuplicateKeyError as error:
            raise ValueError(f"gui answer has a {error}: {answer!r}") from None
        except ValueError:
            raise ValueError(f"gui answer is not a JSON action: {answer!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"gui answer must be a dict, got {answer!r}")
    value = dict(value)
    default_grid = ANDROID_WORLD_GRID if "action_type" in value else boxes.GRID
    grid = value.pop("grid", default_grid)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"gui answer grid must be a positive integer (999 or 1000), got {grid!r}")
    action = as_ours(value)
    if action is None:
        raise ValueError(f"gui answer mixes our keys (action, box) with Android-World's (action_type, box_2d): "
                         f"{answer!r}")
    if not isinstance(action.get("action"), str):
        raise ValueError(f"gui answer must have an 'action' (or 'action_type') string, got {answer!r}")
    if "box" in action and not boxes.is_valid(action["box"], grid):
        raise ValueError(f"gui answer box must be [x1, y1, x2, y2] (Android-World: [[x1, y1, x2, y2]]) on the "
                         f"0-{grid} grid, got {answer!r}")
    if "text" in action and not isinstance(action["text"], str):
        raise ValueError(f"gui answer text must be a string, got {action['text']!r}")
    return action, grid


def _text(value: str) -> str:
    return " ".join(value.split())


def _key_matches(key: str, pred, reference, grid: float, config: RewardConfig) -> bool:
    if key == "box":
        return boxes.is_valid(pred, grid) and boxes.iou(pred, reference) >= config.iou_threshold
    if key == "text":
        return isinstance(pred, str) and _text(pred) == _text(reference)
    return type(pred) is type(reference) and pred == reference


def score(extracted: str, reference: tuple, config: RewardConfig) -> tuple[float, dict]:
    expected, grid = reference
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
    action = as_ours(action)
    if action is None:
        return 0.0, {"reason": "mixed_forms"}
    if set(action) != set(expected):
        return 0.0, {"reason": "keys_differ"}
    failed = [k for k in expected if not _key_matches(k, action[k], expected[k], grid, config)]
    return float(not failed), ({"mismatch": failed} if failed else {})
