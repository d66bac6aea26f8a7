"""compute_reward: format gate -> repetition check -> the domain's verifier (or registered judge)."""
from __future__ import annotations

from typing import Any

from glmv_jax.rewards import format as fmt
from glmv_jax.rewards import judge, registry
from glmv_jax.rewards.repetition import is_heavily_repetitive
from glmv_jax.rewards.result import RewardConfig, RewardResult, fail

DEFAULT_CONFIG = RewardConfig()


def compute_reward(domain: str, response: str | None, answer: Any, style: str = "glm41v",
                   config: RewardConfig | None = None, context: dict | None = None) -> RewardResult:
    """Score one response.

    domain: a verifiable domain (registry.VERIFIERS) or one with a registered judge; anything else raises.
    response: the decoded completion (special tokens kept), None counts as empty.
    answer: the reference, in the domain's form (design.md table); a malformed reference raises ValueError.
    style: "glm41v" (answer tags), "glm45v" / "glm46v" (no answer tags), "glm45v_nothink" (no think block).
    context: passed to judges only (question, image paths, ...).
    Never raises on the response's content; 0 reward with info["reason"] for every rejection.
    """
    registry.check_domain(domain)
    fmt.check_style(style)
    config = DEFAULT_CONFIG if config is None else config
    parsed = fmt.split_sections(response, style)
    if not parsed.ok:
        return fail(parsed.error, format_ok=False)

    judge_fn = None if domain in registry.VERIFIERS else judge.get_judge(domain)
    if judge_fn is not None:
        extracted = parsed.answer.strip()
        if fmt.has_box_marker(extracted):
            return fail("box_in_open_ended_answer", extracted, format_ok=False)
        if not extracted:
            return fail("empty_answer", None, format_ok=False)
    else:
        extracted, error = fmt.extract_box(parsed.answer)
        if error:
            return fail(error, format_ok=False)

    penalty = 1.0
    info: dict = {}
    if config.repetition_penalty > 0:
        repetitive, count = is_heavily_repetitive(response, config.repetition_window,
                                                  config.repetition_max_repeats)
        if repetitive:
            if config.repetition_penalty >= 1.0:
                return fail("repetition", extracted, repetition=count)
            penalty, info["repetition"] = 1.0 - config.repetition_penalty, count

    if judge_fn is not None:
        reward, verdict = judge.run_judge(domain, judge_fn, extracted, answer, context or {}), {"judge": True}
    else:
        reward, verdict = registry.VERIFIERS[domain](extracted, answer, config)
    return RewardResult(min(1.0, max(0.0, reward * penalty)), True, extracted, {**verdict, **info})
