"""The result type every verifier returns, and the knobs of the reward system."""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable

STYLES = ("glm41v", "glm45v", "glm46v", "glm45v_nothink")
"""Response formats (docs/data.md section 3, response styles).

glm41v          <think>...</think><answer>...<|begin_of_box|>X<|end_of_box|>...</answer>
glm45v, glm46v  <think>...</think>...<|begin_of_box|>X<|end_of_box|>...   (no answer tags)
glm45v_nothink  ...<|begin_of_box|>X<|end_of_box|>...   (thinking off: the prompt already ends <think></think>)
"""


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """reward in [0, 1]; format_ok: the response had the required structure (and one box where needed);
    extracted: the graded text (box content, or the answer section for judged domains), None if absent;
    info: why, e.g. {"reason": "hedge"}, {"path": "numeric"}, {"timeout": True}, {"repetition": 12}."""
    reward: float
    format_ok: bool
    extracted: str | None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Knobs; the defaults are the ones the RL loop uses.

    repetition_window / repetition_max_repeats: a response in which some `window`-char span occurs
      `max_repeats` or more times (non-overlapping) is "heavily repetitive"; its reward is multiplied by
      (1 - repetition_penalty). penalty 1.0 zeroes it, 0.0 disables the check.
    math_time_limit_s: wall-clock budget of the sympy / math-verify work for one response: an alarm in the
      worker interrupts it and the response scores 0 with info["timeout"]; if the worker has not replied
      math_kill_grace_s later (work the alarm cannot interrupt) it is killed and replaced.
    math_max_chars: longer math answers score 0 without parsing (info["reason"] == "too_long").
    math_max_depth: deeper bracket nesting ((, [, {) scores 0 without parsing.
    math_rel_tol: relative tolerance when both sides are plain numbers.
    chart_rel_tol: relative tolerance of the chart domain (years are compared exactly); GLM-V's released reward
      uses chart.GLMV_REL_TOL = 0.025.
    iou_threshold: grounding / gui box match threshold.
    max_boxes: grounding answers with more predicted boxes than this score 0 without matching.
    ocr_ignore_case: compare OCR text case-insensitively.
    """
    repetition_window: int = 50
    repetition_max_repeats: int = 10
    repetition_penalty: float = 1.0
    math_time_limit_s: float = 0.7
    math_kill_grace_s: float = 0.2
    math_max_chars: int = 400
    math_max_depth: int = 8
    math_rel_tol: float = 1e-6
    chart_rel_tol: float = 0.02
    iou_threshold: float = 0.5
    max_boxes: int = 100
    ocr_ignore_case: bool = False

    def __post_init__(self):
        if self.repetition_window < 1 or self.repetition_max_repeats < 2:
            raise ValueError(f"repetition_window must be >= 1 and repetition_max_repeats >= 2, got "
                             f"{self.repetition_window}, {self.repetition_max_repeats}")
        if not 0.0 <= self.repetition_penalty <= 1.0:
            raise ValueError(f"repetition_penalty must be in [0, 1], got {self.repetition_penalty}")
        if self.math_time_limit_s <= 0 or self.math_kill_grace_s <= 0:
            raise ValueError(f"math_time_limit_s and math_kill_grace_s must be > 0, got "
                             f"{self.math_time_limit_s}, {self.math_kill_grace_s}")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if self.chart_rel_tol < 0 or self.math_rel_tol < 0:
            raise ValueError("relative tolerances must be >= 0")


def fail(reason: str, extracted: str | None = None, format_ok: bool = True, **info) -> RewardResult:
    """A zero reward with its reason."""
    return RewardResult(0.0, format_ok, extracted, {"reason": reason, **info})


def count_reasons(results: Iterable[RewardResult]) -> collections.Counter:
    """How many results carry each info["reason"] (results without one are not counted), e.g. for metrics:
    count_reasons(results)["verifier_error"] is the number of responses a verifier raised on."""
    return collections.Counter(r.info["reason"] for r in results if "reason" in r.info)
