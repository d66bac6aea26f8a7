"""compute_reward: reference check -> format gate -> repetition check -> the domain's verifier or judge."""
from __future__ import annotations

from typing import Any, Sequence

from glmv_jax.rewards import format as fmt
from glmv_jax.rewards import registry
from glmv_jax.rewards.repetition import is_heavily_repetitive
from glmv_jax.rewards.result import RewardConfig, RewardResult, fail

DEFAULT_CONFIG = RewardConfig()


def compute_reward(domain: str, response: str | None, answer: Any, style: str = "glm41v",
                   config: RewardConfig | None = None, context: dict | None = None) -> RewardResult:
    """Score one response.

    domain: a verifiable domain (registry.VERIFIERS) or one with a registered judge; anything else raises.
    response: the decoded completion (special tokens kept); None counts as empty.
    answer: the reference in the domain's form (docs/rl.md section 3); a malformed one raises ValueError.
    style: "glm41v" (answer tags), "glm45v" / "glm46v" (no answer tags), "glm45v_nothink" (no think block).
    context: passed to judges only (question, image paths, ...).
    Never raises on the response's content: every rejection is reward 0 with info["reason"]; a verifier
    that raises on it (a bug) gives {"reason": "verifier_error", "error": the exception's type name}.
    """
    return compute_rewards(domain, [response], answer, style, config, context)[0]


def compute_rewards(domain: str, responses: Sequence[str | None], answer: Any, style: str = "glm41v",
                    config: RewardConfig | None = None, context: dict | None = None,
                    verifier_override: str | None = None) -> list[RewardResult]:
    """compute_reward for a group of responses to one prompt (the reference is checked once).
    verifier_override: the name of a weakened verifier (rewards/weak.py) to score with instead of the
    domain's real one (the weak-verifier experiment only)."""
    registry.check_domain(domain)
    fmt.check_style(style)
    config = DEFAULT_CONFIG if config is None else config
    verifier = registry.verifier_for(domain, verifier_override)
    if verifier is not None:
        reference = verifier.reference(answer)
        return [_score_one(response, style, config,
                           lambda text: _verify(verifier, text, reference, config), judged=False)
                for response in responses]
    judge_fn = registry.get_judge(domain)
    return [_score_one(response, style, config,
                       lambda text: (registry.run_judge(domain, judge_fn, text, answer, context or {}), {"judge": True}),
                       judged=True)
            for response in responses]


def _verify(verifier, text: str, reference, config: RewardConfig) -> tuple[float, dict]:
    """verifier.score, with any exception on the response's text (a verifier bug) scored 0, not raised."""
    try:
        return verifier.score(text, reference, config)
    except Exception as error:
        return 0.0, {"reason": "verifier_error", "error": type(error).__name__}


def _score_one(response, style, config, grade, judged: bool) -> RewardResult:
    parsed = fmt.split_sections(response, style)
    if not parsed.ok:
        return fail(parsed.error, format_ok=False)
    if judged:  # open-ended: the whole answer section, which must not hold a box
        extracted, error = parsed.answer.strip(), None
        if fmt.has_box_marker(extracted):
            extracted, error = None, "box_in_open_ended_answer"
        elif not extracted:
            extracted, error = None, "empty_answer"
    else:
        extracted, error = fmt.extract_box(parsed.answer)
    if error:
        return fail(error, format_ok=False)

    penalty, info = 1.0, {}
    if config.repetition_penalty > 0:
        repetitive, count = is_heavily_repetitive(response, config.repetition_window,
                                                  config.repetition_max_repeats)
        if repetitive and config.repetition_penalty >= 1.0:
            return fail("repetition", extracted, repetition=count)
        if repetitive:
            penalty, info["repetition"] = 1.0 - config.repetition_penalty, count

    reward, verdict = grade(extracted)
    return RewardResult(min(1.0, max(0.0, reward * penalty)), True, extracted, {**verdict, **info})
