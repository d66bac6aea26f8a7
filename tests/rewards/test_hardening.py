"""Reward hacking and hostile inputs: none earns reward, none raises; the slowest case is recorded.

Wall time is recorded (pytest record_property "slowest_case_s", printed with -s) but not asserted: the
1 s bound rests on the worker time limit, whose timeout path test_math.py checks with a sleeping verifier.
"""
import json
import random
import time

import pytest

from glmv_jax.rewards import compute_reward, compute_rewards
from glmv_jax.rewards import math as math_verifier
from tests.rewards.helpers import BOX_CLOSE, BOX_OPEN, respond

# domain -> (a correct box, the reference, a plausible wrong candidate)
CASES = {
    "math": ("3", "3", "4"),
    "choice": ("B", "B", "C"),
    "counting": ("3", 3, "4"),
    "chart": ("45", "45", "60"),
    "ocr": ("Hello", "Hello", "Hallo"),
    "grounding": ("[100, 100, 200, 200]", [[100, 100, 200, 200]], "[500, 500, 600, 600]"),
    "gui": (json.dumps({"action": "click", "box": [1, 1, 9, 9]}), {"action": "click", "box": [1, 1, 9, 9]},
            json.dumps({"action": "type", "text": "x"})),
}
_rng = random.Random(0)
UNICODE_JUNK = "".join(chr(_rng.choice([0x200b, 0x202e, 0xfeff, 0x1f600, 0x0663, 0xd7ff, 0x7, 0x0, 0x10ffff,
                                        0x4e00 + _rng.randrange(500)])) for _ in range(300))
RANDOM_TEXT = "".join(_rng.choice("abcdefghij0123456789+-*/^(){}[]\\ ,.") for _ in range(100_000))


def structural_attacks(good, wrong):
    """Responses that must earn 0 in every domain, whatever the box holds."""
    box = f"{BOX_OPEN}{good}{BOX_CLOSE}"
    return {
        "none": None,
        "empty": "",
        "no_structure": good,
        "two_boxes": f"<think>t</think><answer>{box} or {BOX_OPEN}{wrong}{BOX_CLOSE}</answer>",
        "same_box_twice": f"<think>t</think><answer>{box}{box}</answer>",
        "box_after_answer": f"<think>t</think><answer>see below</answer>{box}",
        "box_in_think_only": f"<think>{box}</think><answer>{good}</answer>",
        "empty_box": respond(""),
        "whitespace_box": respond(" \n\t "),
        "legacy_boxed": respond(f"\\boxed{{{good}}}"),
        "unclosed_box": f"<think>t</think><answer>{BOX_OPEN}{good}</answer>",
        "nested_think": f"<think>a<think>b</think></think><answer>{box}</answer>",
        "truncated": f"<think>{'step. ' * 20}",
        "endless_thinking_loop": respond(good, think="Let me count the objects once more. " * 3000),
        "endless_answer_loop": f"<think>t</think><answer>{box}{' I am sure.' * 3000}</answer>",
        "loop_inside_box": respond(good + " " + "and again " * 3000),
        "junk_box": respond(UNICODE_JUNK),
        "junk_around_box": respond(UNICODE_JUNK + good + UNICODE_JUNK),
        "huge_random_box": respond(RANDOM_TEXT),
    }


def hedges(good, wrong):
    return {
        "or": respond(f"{good} or {wrong}"),
        "comma_list": respond(f"{good}, {wrong}"),
        "between": respond(f"a number between 0 and {good}"),
        "range_words": respond(f"somewhere from {wrong} to {good}"),
        "text_or": respond(f"{good} \\text{{ or }} {wrong}"),
    }


MATH_BOMBS = {
    "power_tower_python": "9**9**9**9", "power_tower_latex": "9^{9^{9^{9}}}", "huge_exponent": "2^{99999999}",
    "factorial_bomb": "99999999!", "nested_parens": "(" * 5000 + "3" + ")" * 5000,
    "deep_fracs": "\\frac{1}{" * 200 + "3" + "}" * 200, "divide_by_zero": "\\frac{1}{0}",
    "long_latex": "+".join(f"\\sqrt{{{i}}}" for i in range(1200)), "unbalanced": "\\frac{3}{",
    "zero_over_zero": "0/0", "infinity": "\\infty", "nan": "nan", "code": "__import__('os').system('true')",
    "python_lambda": "(lambda: 3)()", "set_hedge": "\\{3, 4\\}", "interval_hedge": "[2, 4]",
    "inequality_hedge": "2 < x < 4", "plus_minus_hedge": "3 \\pm 1", "approx_hedge": "\\approx 3",
}


@pytest.fixture(scope="module")
def timings():
    math_verifier.warm_up()  # do not charge the worker's start-up to the first case that needs it
    record = {}
    yield record
    slowest = max(record, key=record.get)
    print(f"\n[rewards] {len(record)} hostile cases, slowest {record[slowest]:.3f} s ({slowest})")


def timed(timings, key, domain, response, answer, **kwargs):
    start = time.perf_counter()
    result = compute_reward(domain, response, answer, **kwargs)
    timings[key] = time.perf_counter() - start
    return result


@pytest.mark.parametrize("domain", CASES)
def test_structural_attacks_earn_nothing(domain, timings):
    good, answer, wrong = CASES[domain]
    assert compute_reward(domain, respond(good), answer).reward == 1.0  # the attacks' honest baseline
    for name, response in structural_attacks(good, wrong).items():
        result = timed(timings, f"{domain}/{name}", domain, response, answer)
        assert result.reward == 0.0, (name, result)


@pytest.mark.parametrize("domain", [d for d in CASES if d != "ocr"])
def test_hedged_answers_earn_nothing(domain, timings):
    good, answer, wrong = CASES[domain]
    for name, response in hedges(good, wrong).items():
        result = timed(timings, f"{domain}/hedge_{name}", domain, response, answer)
        if domain == "grounding" and name == "comma_list":
            # two boxes are a two-box prediction: by the contract matched / max(#pred, #ref) = 1/2
            assert result.reward == 0.5, result
        else:
            assert result.reward == 0.0, (name, result)


def test_ocr_hedges_score_below_half():
    """OCR's reward is continuous by design (1 - normalised edit distance): a two-candidate hedge keeps
    some credit, but less than half, and far less than the exact reading."""
    good, answer, wrong = CASES["ocr"]
    for name, response in hedges(good, wrong).items():
        assert compute_reward("ocr", response, answer).reward < 0.5, name


def test_every_option_listed_earns_nothing():
    for box in ("A,B,C,D", "ABCD", "A B C D", "A, B, C, D, E", "(A)(B)(C)(D)", "all of the above"):
        assert compute_reward("choice", respond(box), "B").reward == 0.0, box
    grid = [[x, y, x + 50, y + 50] for x in range(0, 1000, 50) for y in range(0, 1000, 50)]
    assert compute_reward("grounding", respond(json.dumps(grid)), [[100, 100, 150, 150]]).reward == 0.0


@pytest.mark.parametrize("name", MATH_BOMBS)
def test_math_bombs_earn_nothing(name, timings):
    result = timed(timings, f"math/{name}", "math", respond(MATH_BOMBS[name]), "3")
    assert result.reward == 0.0 and result.format_ok, result


@pytest.mark.parametrize("style", ["glm45v", "glm45v_nothink"])
def test_attacks_in_the_glm45v_styles(style):
    two_boxes = f"{BOX_OPEN}3{BOX_CLOSE} or {BOX_OPEN}4{BOX_CLOSE}"
    prefix = "" if style == "glm45v_nothink" else "<think>t</think>"
    for response in (prefix + two_boxes, prefix + f"{BOX_OPEN} {BOX_CLOSE}", prefix + "3",
                     prefix + f"<answer>{BOX_OPEN}3{BOX_CLOSE}</answer>", respond("3 or 4", style),
                     respond("3", style, think="loop " * 5000) if style == "glm45v" else None):
        assert compute_reward("counting", response, 3, style=style).reward == 0.0


def test_group_scoring_matches_one_by_one():
    good, answer, wrong = CASES["math"]
    responses = [respond(good), respond(wrong), None, respond(f"{good} or {wrong}"), respond("6/2")]
    group = compute_rewards("math", responses, answer)
    assert [r.reward for r in group] == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert group == [compute_reward("math", r, answer) for r in responses]
