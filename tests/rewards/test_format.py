"""Format gate and box extraction, for every response style."""
import pytest

from glmv_jax.rewards import STYLES, compute_reward
from glmv_jax.rewards.format import extract_box, split_sections
from tests.rewards.helpers import BOX_CLOSE, BOX_OPEN, respond


@pytest.mark.parametrize("style", STYLES)
def test_well_formed_response_is_extracted(style):
    result = compute_reward("counting", respond(" 7 ", style), 7, style=style)
    assert result.format_ok and result.reward == 1.0 and result.extracted == "7"


def test_glm41v_sections_and_surrounding_whitespace():
    parsed = split_sections("\n<think>a</think>\n\n<answer>b</answer>\n", "glm41v")
    assert parsed.ok and parsed.think == "a" and parsed.answer == "b"


def test_glm45v_answer_is_everything_after_think():
    parsed = split_sections("<think></think>\nSo it is x.", "glm45v")
    assert parsed.ok and parsed.think == "" and parsed.answer == "\nSo it is x."


@pytest.mark.parametrize("response, reason", [
    ("<answer><|begin_of_box|>7<|end_of_box|></answer>", "bad_think_tags"),                 # no think
    ("<think>a<think>b</think><answer>x</answer>", "bad_think_tags"),                        # nested think
    ("<think>a</think><|begin_of_box|>7<|end_of_box|>", "bad_answer_tags"),                  # 4.5V text in 4.1V style
    ("<think>a</think><answer>x<answer>y</answer>", "bad_answer_tags"),
    ("<think>a</think>oops<answer><|begin_of_box|>7<|end_of_box|></answer>", "text_outside_answer"),
    ("<think>a</think><answer>7</answer><|begin_of_box|>7<|end_of_box|>", "text_outside_answer"),  # box after
    ("<think>a</think><answer><|begin_of_box|>7<|end_of_box|>", "bad_answer_tags"),          # truncated
    ("lead <think>a</think><answer><|begin_of_box|>7<|end_of_box|></answer>", "bad_think_tags"),
])
def test_glm41v_malformed_structure_scores_zero(response, reason):
    result = compute_reward("counting", response, 7)
    assert (result.reward, result.format_ok, result.info["reason"]) == (0.0, False, reason)


@pytest.mark.parametrize("response, reason", [
    ("<think>a</think><answer><|begin_of_box|>7<|end_of_box|></answer>", "unexpected_answer_tags"),
    ("<|begin_of_box|>7<|end_of_box|>", "bad_think_tags"),
    ("<think>a</think>x</think><|begin_of_box|>7<|end_of_box|>", "bad_think_tags"),
])
def test_glm45v_malformed_structure_scores_zero(response, reason):
    result = compute_reward("counting", response, 7, style="glm45v")
    assert (result.reward, result.format_ok, result.info["reason"]) == (0.0, False, reason)


def test_nothink_style_rejects_think_tags():
    result = compute_reward("counting", respond("7", "glm45v"), 7, style="glm45v_nothink")
    assert not result.format_ok and result.info["reason"] == "unexpected_tags"


@pytest.mark.parametrize("answer, expected", [
    (f"x {BOX_OPEN} 12 {BOX_CLOSE} y", ("12", None)),
    ("no box here", (None, "no_box")),
    (f"{BOX_OPEN}1{BOX_CLOSE} or {BOX_OPEN}2{BOX_CLOSE}", (None, "several_boxes")),
    (f"{BOX_OPEN}{BOX_OPEN}1{BOX_CLOSE}", (None, "several_boxes")),
    (f"{BOX_CLOSE}1{BOX_OPEN}", (None, "unbalanced_box")),
    (f"{BOX_OPEN}1", (None, "unbalanced_box")),
    (f"{BOX_OPEN}   {BOX_CLOSE}", (None, "empty_box")),
    (f"{BOX_OPEN}\\boxed{{1}}{BOX_CLOSE}", (None, "legacy_boxed")),
    ("\\boxed{1}", (None, "legacy_boxed")),
])
def test_extract_box(answer, expected):
    assert extract_box(answer) == expected


@pytest.mark.parametrize("style", ["glm41v", "glm45v"])
def test_box_only_in_think_is_not_an_answer(style):
    think = f"maybe {BOX_OPEN}7{BOX_CLOSE}"
    response = f"<think>{think}</think>" + ("<answer>7</answer>" if style == "glm41v" else "7")
    result = compute_reward("counting", response, 7, style=style)
    assert result.reward == 0.0 and result.info["reason"] == "no_box"


@pytest.mark.parametrize("response", [None, "", "   \n"])
def test_empty_response(response):
    result = compute_reward("math", response, "3")
    assert (result.reward, result.format_ok, result.extracted) == (0.0, False, None)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown reward domain 'poetry'"):
        compute_reward("poetry", respond("x"), "x")
    with pytest.raises(ValueError, match="unknown response style 'glm5'"):
        compute_reward("math", respond("1"), "1", style="glm5")
    with pytest.raises(TypeError, match="response must be a str or None, got int"):
        compute_reward("math", 3, "3")
