"""Math verifier: equivalent forms, cheap paths, guards, and the hard time limit of the sympy worker."""
import time

import pytest

from glmv_jax.rewards import RewardConfig, compute_reward
from glmv_jax.rewards import math as math_verifier
from glmv_jax.rewards.math import hedge_markers
from tests.rewards.helpers import respond

# Positive sympy cases get a generous budget: the default 0.8 s is for production, while this 2-core test
# machine is shared by many processes; the timeout mechanism itself is tested below with the default.
ROOMY = RewardConfig(math_time_limit_s=20.0)
LONG_LATEX = "+".join(f"\\frac{{{i}}}{{{i + 1}}}" for i in range(700))  # ~10k chars, no repeated span


def score(box, answer, config=ROOMY, style="glm41v"):
    return compute_reward("math", respond(box, style), answer, style=style, config=config)


@pytest.mark.parametrize("box, answer, path", [
    ("0.5", "1/2", "numeric"),
    ("\\frac{1}{2}", "0.5", "numeric"),
    ("1/2", "\\frac{1}{2}", "numeric"),
    ("-\\dfrac{3}{4}", "-0.75", "numeric"),
    ("1,000", "1000", "numeric"),
    ("42.", "42", "string"),
    ("$42$", "42", "string"),
    ("2\\sqrt{2}", "\\sqrt{8}", "sympy"),
    ("\\sqrt{8}", "2\\sqrt{2}", "sympy"),
    ("(x-1)(x+1)", "x^2-1", "sympy"),
    ("x^2 - 1", "(x+1)(x-1)", "sympy"),
    ("x**2-1", "x^2-1", "string"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", "sympy"),
    ("3\\pi", "3 \\pi", "string"),
    ("\\frac{3\\pi}{3}", "\\pi", "sympy"),
    ("e^{-x^{2}}", "e^{-x^2}", "sympy"),
    ("((x+1)^2)^3", "(x+1)^6", "sympy"),
    ("2^{10}", "1024", "sympy"),
    ("x=3", "3", "sympy"),
    ("10\\%", "0.1", "sympy"),
    ("0.3333333", "1/3", "numeric"),
])
@pytest.mark.parametrize("style", ["glm41v", "glm45v"])
def test_equivalent_forms_earn_full_reward(box, answer, path, style):
    result = score(box, answer, style=style)
    assert result.reward == 1.0, result
    assert result.info["path"] == path


@pytest.mark.parametrize("box, answer", [
    ("0.5", "1/3"), ("0.333", "1/3"), ("2", "-2"), ("\\sqrt{2}", "2"), ("x^2+1", "x^2-1"),
    ("(x-1)^2", "x^2-1"), ("y", "x"), ("\\frac{1}{0}", "3"), ("\\pi", "3.14"),
])
def test_different_values_earn_nothing(box, answer):
    assert score(box, answer).reward == 0.0


def test_reference_forms_and_errors():
    assert score("7", 7).reward == 1.0
    assert score("2.5", 2.5).reward == 1.0
    with pytest.raises(ValueError, match="math answer must be a string or a number, got list"):
        score("1", [1])
    with pytest.raises(ValueError, match="math answer is empty"):
        score("1", "  ")


@pytest.mark.parametrize("box, reason", [
    ("3 or 4", "hedge"), ("3 \\text{ or } 4", "hedge"), ("a number between 0 and 10", "hedge"),
    ("3, 4", "hedge"), ("\\{3, 4\\}", "hedge"), ("x < 10", "hedge"), ("\\approx 3", "hedge"),
    ("3 \\pm 1", "hedge"), ("~3", "hedge"), ("1, ..., 10", "hedge"),
    ("9**9**9**9", "huge_number"), ("9^{9^{9^{9}}}", "huge_number"), ("(9^9)^(9^9)", "huge_number"),
    ("2^{123456789}", "huge_number"), ("99999999!", "huge_number"), ("{12345}!", "huge_number"),
    ("(" * 40 + "3" + ")" * 40, "too_deep"),
    ("\\frac{" * 30 + "1" + "}{2}" * 30, "too_deep"),
    (LONG_LATEX, "too_long"), ("+".join(f"x_{{{i}}}" for i in range(60)), "too_long"),
    ("3\u200b", "bad_chars"), ("\u0663", "bad_chars"), ("3 $ 3", "bad_chars"), ("\x00 3", "bad_chars"),
])
def test_guards_reject_before_parsing(box, reason):
    result = score(box, "3", config=RewardConfig())
    assert result.reward == 0.0 and result.format_ok
    assert result.info["reason"] == reason


def test_hedge_markers_allowed_when_the_reference_has_them():
    assert hedge_markers("x > 3") == {">"}
    assert score("x>3", "x > 3").reward == 1.0
    assert score("(1, 2)", "(1,2)").reward == 1.0
    assert score("\\{3, 4\\}", "\\{4, 3\\}").reward == 1.0
    assert hedge_markers("1,000,000") == set()


@pytest.mark.parametrize("slow_fn, killed", [
    ("tests.rewards.helpers:sleep_then_equal", False),          # interrupted by the worker's own alarm
    ("tests.rewards.helpers:sleep_with_alarm_blocked", True),   # only killing the worker ends it
])
def test_slow_verifier_times_out_and_scoring_recovers(monkeypatch, slow_fn, killed):
    """A verifier that sleeps 60 s: at the default budget the response scores 0 with a timeout, through
    the alarm or the kill, and the next response is scored normally."""
    monkeypatch.setattr(math_verifier, "EQUIVALENCE_FN", slow_fn)
    math_verifier.warm_up()
    start = time.perf_counter()
    result = score("x+1", "1+x", config=RewardConfig())
    elapsed = time.perf_counter() - start
    print(f"\n[rewards] timeout via {'kill' if killed else 'alarm'}: {elapsed:.3f} s")
    assert result.reward == 0.0 and result.format_ok
    assert result.info["timeout"] is True and result.info["reason"] == "timeout"
    assert result.info["worker_killed"] is killed
    assert elapsed < 30  # far below the 60 s sleep: the budget, not the sleep, ended the call
    monkeypatch.undo()
    assert score("x+1", "1+x").reward == 1.0


def test_worker_errors_become_zero(monkeypatch):
    monkeypatch.setattr(math_verifier, "EQUIVALENCE_FN", "tests.rewards.helpers:fail_loudly")
    result = score("x+1", "1+x")
    assert result.reward == 0.0 and result.info["reason"] == "verifier_error"
    assert result.info["error"] == "ArithmeticError: cannot compare 1+x and x+1"
