"""Format gate: split a response into think / answer sections and extract the single box.

Plain string scanning (str.count / str.find), linear in the response length; no regex backtracking.
"""
from __future__ import annotations

import dataclasses

from glmv_jax.rewards.result import STYLES

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
BOX_OPEN, BOX_CLOSE = "<|begin_of_box|>", "<|end_of_box|>"
LEGACY_BOX = "\\boxed{"
STRUCTURE_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


@dataclasses.dataclass(frozen=True)
class Parsed:
    """ok: the structure is valid; error: why not (a short reason code); think / answer: the sections."""
    ok: bool
    error: str | None = None
    think: str | None = None
    answer: str | None = None


def check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"unknown response style {style!r}; expected one of {STYLES}")
    return style


def split_sections(response: str | None, style: str = "glm41v") -> Parsed:
    """Split `response` into (think, answer) following `style` (see result.STYLES).

    glm41v: the whole response (outer whitespace aside) is <think>T</think> <answer>A</answer>, one of each
    tag, in that order, only whitespace between </think> and <answer>. glm45v/glm46v: <think>T</think> then
    the answer text, with no further structure tags. glm45v_nothink: the whole response is the answer.
    """
    check_style(style)
    if response is not None and not isinstance(response, str):
        raise TypeError(f"response must be a str or None, got {type(response).__name__}")
    if response is None or not response.strip():
        return Parsed(False, "empty_response")
    text = response.strip()
    counts = {tag: text.count(tag) for tag in STRUCTURE_TAGS}
    if style == "glm45v_nothink":
        if any(counts.values()):
            return Parsed(False, "unexpected_tags")
        return Parsed(True, think="", answer=text)
    if counts[THINK_OPEN] != 1 or counts[THINK_CLOSE] != 1 or not text.startswith(THINK_OPEN):
        return Parsed(False, "bad_think_tags")
    think_end = text.index(THINK_CLOSE)
    think = text[len(THINK_OPEN):think_end]
    rest = text[think_end + len(THINK_CLOSE):]
    if style in ("glm45v", "glm46v"):
        if counts[ANSWER_OPEN] or counts[ANSWER_CLOSE]:
            return Parsed(False, "unexpected_answer_tags")
        return Parsed(True, think=think, answer=rest)
    # glm41v
    rest = rest.lstrip()
    if counts[ANSWER_OPEN] != 1 or counts[ANSWER_CLOSE] != 1:
        return Parsed(False, "bad_answer_tags")
    if not rest.startswith(ANSWER_OPEN) or not rest.endswith(ANSWER_CLOSE):
        return Parsed(False, "text_outside_answer")
    return Parsed(True, think=think, answer=rest[len(ANSWER_OPEN):-len(ANSWER_CLOSE)])


def extract_box(answer: str) -> tuple[str | None, str | None]:
    """The stripped content of the answer section's single box -> (content, None), or (None, reason)."""
    n_open, n_close = answer.count(BOX_OPEN), answer.count(BOX_CLOSE)
    if LEGACY_BOX in answer:
        return None, "legacy_boxed"
    if n_open == 0 and n_close == 0:
        return None, "no_box"
    if n_open != 1 or n_close != 1:
        return None, "several_boxes" if n_open > 1 or n_close > 1 else "unbalanced_box"
    start, end = answer.index(BOX_OPEN) + len(BOX_OPEN), answer.index(BOX_CLOSE)
    if end < start:
        return None, "unbalanced_box"
    content = answer[start:end].strip()
    if not content:
        return None, "empty_box"
    return content, None


def has_box_marker(text: str) -> bool:
    return BOX_OPEN in text or BOX_CLOSE in text or LEGACY_BOX in text
