"""The judge hook for open-ended domains, and the repetition detector / penalty."""
import random

import pytest

from glmv_jax.rewards import RewardConfig, compute_reward, register_judge, registry, unregister_judge
from glmv_jax.rewards.repetition import is_heavily_repetitive, max_repeats
from tests.rewards.helpers import BOX_CLOSE, BOX_OPEN, respond


@pytest.fixture
def caption_judge():
    calls = []

    def judge(answer_text, reference, context):
        calls.append((answer_text, reference, context))
        return 1.0 if reference.lower() in answer_text.lower() else 0.25

    register_judge("caption", judge)
    yield calls
    unregister_judge("caption")


def test_judges_are_off_by_default():
    assert registry.domains() == ("math", "choice", "counting", "chart", "ocr", "grounding", "gui")
    with pytest.raises(ValueError, match="unknown reward domain 'caption'.*register_judge"):
        compute_reward("caption", "<think>t</think><answer>a cat</answer>", "cat")


def test_registered_judge_scores_the_answer_section(caption_judge):
    assert "caption" in registry.domains()
    response = "<think>look</think><answer> A black cat on a mat. </answer>"
    result = compute_reward("caption", response, "cat", context={"question": "What is shown?"})
    assert (result.reward, result.format_ok, result.extracted) == (1.0, True, "A black cat on a mat.")
    assert result.info == {"judge": True}
    assert caption_judge == [("A black cat on a mat.", "cat", {"question": "What is shown?"})]
    assert compute_reward("caption", "<think>t</think>\nA dog.", "cat", style="glm45v").reward == 0.25


def test_judged_domains_still_pass_the_format_gate_and_reject_boxes(caption_judge):
    for response in (None, "a cat", "<think>t</think><answer>  </answer>",
                     f"<think>t</think><answer>{BOX_OPEN}cat{BOX_CLOSE}</answer>",
                     "<think>t</think><answer>\\boxed{cat}</answer>"):
        assert compute_reward("caption", response, "cat").reward == 0.0
    assert caption_judge == []  # rejected before the judge is asked


def test_judge_registration_errors(caption_judge):
    with pytest.raises(ValueError, match="'math' has a rule-based verifier"):
        register_judge("math", lambda *a: 1.0)
    with pytest.raises(ValueError, match="already registered for 'caption'"):
        register_judge("caption", lambda *a: 1.0)
    with pytest.raises(TypeError, match="must be callable"):
        register_judge("story", "not a function")
    with pytest.raises(KeyError, match="no judge registered for 'story'"):
        unregister_judge("story")


def test_judge_returning_out_of_range_raises():
    register_judge("story", lambda *a: 1.5)
    try:
        with pytest.raises(ValueError, match="judge for 'story' returned 1.5"):
            compute_reward("story", "<think>t</think><answer>once</answer>", "x")
    finally:
        unregister_judge("story")


def _natural_text(n_words, seed=0):
    rng = random.Random(seed)
    return " ".join("".join(rng.choice("etaoinshrdlucmfw") for _ in range(rng.randint(2, 9)))
                    for _ in range(n_words))


def test_max_repeats_counts_non_overlapping_windows_of_any_period():
    text = _natural_text(300)
    assert max_repeats(text, 50) == 1
    assert max_repeats("ab" * 500, 50) == 20  # 1000 chars / 50, any alignment
    block = _natural_text(20, seed=1)[:137]  # a period that no stride would line up with
    assert max_repeats(text + block * 12 + text[::-1], 50) >= 12
    assert max_repeats("-" * 59, 50) == 1  # a long rule is not 10 repeats
    assert max_repeats("short", 50) == 0


def test_is_heavily_repetitive_threshold():
    assert is_heavily_repetitive("x" * 499, 50, 10) == (False, 0)  # too short to hold 10 windows
    assert is_heavily_repetitive("x" * 500, 50, 10) == (True, 10)
    assert is_heavily_repetitive(_natural_text(8000), 50, 10)[0] is False


def test_repetition_penalty_is_configurable():
    looping = respond("3", think="Count again: 1, 2, 3. " * 100)
    # period 22: a 50-char window recurs every 22 chars, non-overlapping every 66: 2200 // 66 = 33
    assert compute_reward("counting", looping, 3).info == {"reason": "repetition", "repetition": 33}
    half = compute_reward("counting", looping, 3, config=RewardConfig(repetition_penalty=0.5))
    assert (half.reward, half.info["repetition"]) == (0.5, 33)
    assert compute_reward("counting", looping, 3, config=RewardConfig(repetition_penalty=0.0)).reward == 1.0
    lenient = RewardConfig(repetition_max_repeats=100)
    assert compute_reward("counting", looping, 3, config=lenient).reward == 1.0
    honest = respond("3", think=_natural_text(3000))
    assert compute_reward("counting", honest, 3).reward == 1.0


def test_config_validation():
    with pytest.raises(ValueError, match="repetition_penalty must be in"):
        RewardConfig(repetition_penalty=2.0)
    with pytest.raises(ValueError, match="iou_threshold"):
        RewardConfig(iou_threshold=0.0)
    with pytest.raises(ValueError, match="math_time_limit_s"):
        RewardConfig(math_time_limit_s=0)
