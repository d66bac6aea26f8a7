"""Responses outside the verifiers' usual cases: inputs that made them raise, LaTeX number and relation
forms, false equations, duplicated JSON keys, and the warm math worker."""
import random

import pytest

from glmv_jax.rewards import compute_reward, compute_rewards
from glmv_jax.rewards import counting as counting_verifier
from tests.rewards.helpers import respond

_rng = random.Random(0)
HUGE_INTEGER = "1" + "".join(_rng.choice("0123456789") for _ in range(4999))  # no repeated 50-char span
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
