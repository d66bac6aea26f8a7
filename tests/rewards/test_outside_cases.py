"""Responses outside the verifiers' usual cases: inputs that made them raise, LaTeX number and relation
forms, false equations, duplicated JSON keys, and the warm math worker."""
import random

import pytest

from glmv_jax.rewards import RewardConfig, compute_reward, compute_rewards, count_reasons
from glmv_jax.rewards import counting as counting_verifier
from glmv_jax.rewards import math as math_verifier
from glmv_jax.rewards.math import normalize
from glmv_jax.rewards.workers import WorkerPool
from tests.rewards.helpers import respond

_rng = random.Random(0)
HUGE_INTEGER = "1" + "".join(_rng.choice("0123456789") for _ in range(4999))  # no repeated 50-char span
ROOMY = RewardConfig(math_time_limit_s=20.0)  # sympy cases on a shared 2-core test machine (as test_math.py)
ANSWERS = {"math": "3", "choice": "B", "counting": 3, "chart": "3", "ocr": "3", "grounding": [[1, 1, 9, 9]],
           "gui": {"action": "click", "box": [1, 1, 9, 9]}}


# ---- inputs that made a verifier raise: reward 0, never an exception
@pytest.mark.parametrize("domain", ["counting", "math", "chart"])
@pytest.mark.parametrize("box", [HUGE_INTEGER, "-" + HUGE_INTEGER, HUGE_INTEGER + ".5"])
def test_a_5000_digit_number_scores_zero(domain, box):
    result = compute_reward(domain, respond(box), ANSWERS[domain])
    assert result.reward == 0.0 and result.format_ok, result
    assert result.info["reason"] != "verifier_error", result  # refused by the parser, not by the safety net


@pytest.mark.parametrize("domain", ANSWERS)
def test_a_lone_surrogate_in_a_long_response_scores_zero(domain):
    """Long enough for the repetition check, which encodes the response."""
    think = " ".join(f"step {i} checks the count" for i in range(60))
    response = respond("3", think=think + "\ud800" + think[::-1])
    result = compute_reward(domain, response, ANSWERS[domain])
    assert result.info.get("reason") != "verifier_error", result
    expected = 1.0 if domain in ("math", "counting", "chart", "ocr") else 0.0  # the box itself is fine
    assert result.reward == expected, result


def test_a_lone_surrogate_in_a_repetitive_response_is_still_caught():
    result = compute_reward("counting", respond("3", think="\ud800 count once more, " * 100), 3)
    assert result.reward == 0.0 and result.info["reason"] == "repetition", result


def test_a_verifier_that_raises_gives_zero_and_names_the_error(monkeypatch):
    def broken(extracted, reference, config):
        if extracted == "3":
            raise OverflowError("a bug in the verifier")
        return 1.0, {}

    monkeypatch.setattr(counting_verifier, "score", broken)
    results = compute_rewards("counting", [respond("3"), respond("4"), None], 3)
    assert [r.reward for r in results] == [0.0, 1.0, 0.0]
    assert results[0].format_ok and results[0].extracted == "3"
    assert results[0].info == {"reason": "verifier_error", "error": "OverflowError"}
    assert results[2].info["reason"] == "empty_response"
    counts = count_reasons(results)
    assert counts == {"verifier_error": 1, "empty_response": 1} and counts["timeout"] == 0


def test_a_malformed_reference_still_raises():
    with pytest.raises(ValueError, match="counting answer must be an integer"):
        compute_reward("counting", respond("3"), HUGE_INTEGER)
    with pytest.raises(ValueError, match="math answer is empty"):
        compute_reward("math", respond("3"), " ")


# ---- LaTeX thousands separators
@pytest.mark.parametrize("domain, box, answer, expected", [
    ("math", "14{,}916", "14916", 1.0), ("math", "32,\\!349", "32349", 1.0), ("math", "$1{,}234{,}567$", "1234567", 1.0),
    ("math", "14916", "14{,}916", 1.0), ("math", "14{,}917", "14916", 0.0), ("math", "12{,}5", "12.5", 0.0),
    ("counting", "14{,}916", 14916, 1.0), ("counting", "32,\\!349", 32349, 1.0), ("counting", "1{,}2", 12, 0.0),
    ("chart", "32,\\!349", "32349", 1.0), ("chart", "14{,}916", "14,916", 1.0), ("chart", "1{,}000\\%", "1000", 1.0),
    ("chart", "2{,}019", "2019", 1.0),
])
def test_latex_thousands_separators(domain, box, answer, expected):
    result = compute_reward(domain, respond(box), answer)
    assert result.reward == expected, result


# ---- relations written the other way round
@pytest.mark.parametrize("box, answer, expected", [
    ("5 \\geq x", "x \\leq 5", 1.0), ("5 > x", "x < 5", 1.0), ("5 < x", "x > 5", 1.0), ("x \\le 5", "x \\leq 5", 1.0),
    ("5 \\ge x", "x \\le 5", 1.0), ("x \\geqslant 1", "1 \\leq x", 1.0), ("5 \\gt x", "x \\lt 5", 1.0),
    ("x <= 5", "x \\leq 5", 1.0), ("5 \\geq x \\geq 1", "1 \\leq x \\leq 5", 1.0), ("5 \\geq x > 1", "1 < x \\leq 5", 1.0),
    ("5.0 \\geq x", "x \\leq 5", 1.0), ("x \\ne 3", "x \\neq 3", 1.0),
    ("x \\geq 5", "x \\leq 5", 0.0), ("5 \\leq x", "x \\leq 5", 0.0), ("5 > x", "x \\leq 5", 0.0),
    ("5 \\geq x", "x < 5", 0.0), ("x > 5", "x \\leq 5", 0.0),
])
def test_mirrored_relations(box, answer, expected):
    result = compute_reward("math", respond(box), answer, config=ROOMY)
    assert result.reward == expected, result


def test_only_whole_top_level_greater_chains_are_mirrored():
    assert normalize("a > b \\geq c") == "c \\leq b < a"
    for text in ("2 < x < 4", "4 > x < 2", "\\{x | x > 3\\}", "f(x>3)", "\\geq 3"):
        assert normalize(text) == text


# ---- equations whose members disagree
@pytest.mark.parametrize("box, answer", [("5 = 6", "6"), ("6 = 5", "6"), ("x = 5 = 6", "6"), ("5=6", "x = 6"),
                                         ("\\frac{1}{2} = 0.6", "0.6")])
def test_false_equations_are_refused(box, answer):
    result = compute_reward("math", respond(box), answer, config=ROOMY)
    assert result.reward == 0.0 and result.info["reason"] == "false_equation", result


@pytest.mark.parametrize("box, answer", [("x = 6", "6"), ("3+3 = 6", "6"), ("6 = 6", "6"), ("6 = 6.0", "6"),
                                         ("\\frac{1}{3} = 0.3333333", "1/3"), ("x = 3", "x = 3")])
def test_true_equations_keep_their_reward(box, answer):
    result = compute_reward("math", respond(box), answer, config=ROOMY)
    assert result.reward == 1.0, result


# ---- GUI actions with a key given twice
CLICK = {"action": "click", "box": [100, 100, 200, 200]}


@pytest.mark.parametrize("box, answer", [
    ('{"action": "click", "action": "type", "text": "x"}', {"action": "type", "text": "x"}),
    ('{"action": "type", "text": "x", "action": "type"}', {"action": "type", "text": "x"}),
    ('{"action": "click", "box": [1, 1, 9, 9], "box": [100, 100, 200, 200]}', CLICK),
    ('{"action": "click", "box": [100, 100, 200, 200], "extra": {"a": 1, "a": 2}}', {**CLICK, "extra": {"a": 2}}),
])
def test_gui_duplicate_keys_are_refused(box, answer):
    result = compute_reward("gui", respond(box), answer)
    assert result.reward == 0.0 and result.info["reason"] == "duplicate_key", result


def test_gui_without_duplicates_still_scores():
    assert compute_reward("gui", respond('{"action": "click", "box": [100, 100, 200, 200]}'), CLICK).reward == 1.0
    with pytest.raises(ValueError, match="gui answer has a duplicate key 'action'"):
        compute_reward("gui", respond("{}"), '{"action": "click", "action": "type"}')


# ---- the math worker imports and exercises its libraries before its first timed call
def test_a_new_math_worker_is_warm_before_its_first_timed_call():
    pool = WorkerPool(("glmv_jax.rewards.math_worker",), max_workers=1)
    try:
        assert pool.warm_up() == ("glmv_jax.rewards.math_worker",)  # the ready handshake names what warmed up
        budget = RewardConfig()  # the production budget, which a cold sympy / math-verify import would exceed
        first = pool.call(math_verifier.EQUIVALENCE_FN, ["x^2-1", "(x-1)(x+1)"], budget.math_time_limit_s,
                          budget.math_kill_grace_s)
        assert not first.timed_out and first.error is None and first.value == {"equal": True}, first
    finally:
        pool.close()


def test_a_pool_without_warm_up_modules_reports_none():
    pool = WorkerPool(max_workers=1)
    try:
        assert pool.warm_up() == ()
    finally:
        pool.close()
