"""GLM-V's released reward conventions beside ours: Android-World GUI actions (declared grid), grounding boxes
in every bracket style, GLM-V's chart tolerance. Each form is accepted on both sides, wrong answers in each
form are refused, and the hostile inputs of test_hardening earn nothing in the new forms either."""
import json

import pytest

from glmv_jax.rewards import RewardConfig, compute_reward
from glmv_jax.rewards import chart
from tests.rewards.helpers import respond
from tests.rewards.test_hardening import hedges, structural_attacks


def reward(domain, box, answer, **config):
    return compute_reward(domain, respond(box), answer, config=RewardConfig(**config))


# ---- gui: Android-World form
OURS = {"action": "click", "box": [100, 100, 200, 200]}
AW = {"action_type": "click", "box_2d": [[100, 100, 200, 200]]}
AW_TEXT = {"action_type": "input_text", "text": "Personal Finance Tracker", "override": True,
           "box_2d": [[38, 115, 960, 141]]}  # glmv_reward's AndroidWorld.py example


@pytest.mark.parametrize("answer", [OURS, AW, json.dumps(AW)])
@pytest.mark.parametrize("action, expected", [
    ({"action_type": "click", "box_2d": [[105, 100, 205, 200]]}, 1.0),
    ({"action": "click", "box": [105, 100, 205, 200]}, 1.0),
    ({"action_type": "click", "box_2d": [[300, 300, 400, 400]]}, 0.0),
    ({"action_type": "long_press", "box_2d": [[100, 100, 200, 200]]}, 0.0),
    ({"action_type": "click", "box_2d": [100, 100, 200, 200]}, 0.0),  # not nested
    ({"action_type": "click", "box_2d": [[100, 100, 200, 200], [100, 100, 200, 200]]}, 0.0),
    ({"action_type": "click", "box_2d": [["100", 100, 200, 200]]}, 0.0),
    ({"action_type": "click"}, 0.0),
    ({"action_type": "click", "box_2d": [[100, 100, 200, 200]], "grid": 999}, 0.0),  # grid is the record's
    ({"action_type": "click", "box": [100, 100, 200, 200]}, 0.0),  # forms mixed
    ({"action": "click", "box_2d": [[100, 100, 200, 200]]}, 0.0),
])
def test_gui_forms(action, answer, expected):
    assert reward("gui", json.dumps(action), answer).reward == expected


def test_gui_android_world_keys():
    close = {"action_type": "input_text", "text": "Personal  Finance Tracker", "override": True,
             "box_2d": [[38, 115, 961, 140]]}
    assert reward("gui", json.dumps(close), AW_TEXT).reward == 1.0
    for wrong in (dict(close, text="Personal Finance"), dict(close, override=False), dict(close, override="true"),
                  {k: v for k, v in close.items() if k != "override"}):
        assert reward("gui", json.dumps(wrong), AW_TEXT).reward == 0.0, wrong
    scroll = {"action_type": "scroll", "direction": "down"}
    assert reward("gui", json.dumps(scroll), scroll).reward == 1.0
    assert reward("gui", json.dumps(dict(scroll, direction="up")), scroll).reward == 0.0
    mixed = reward("gui", json.dumps({"action_type": "click", "action": "click"}), OURS)
    assert mixed.info["reason"] == "mixed_forms"
    duplicate = '{"action_type": "click", "box_2d": [[100, 100, 200, 200]], "action_type": "type"}'
    assert reward("gui", duplicate, AW).info["reason"] == "duplicate_key"


def test_gui_grid_declared_per_record():
    edge = json.dumps({"action_type": "click", "box_2d": [[900, 900, 1000, 1000]]})
    on_1000 = {"action": "click", "box": [900, 900, 1000, 1000]}
    assert reward("gui", edge, on_1000).reward == 1.0  # our form: 0-1000 by default
    assert reward("gui", edge, {"action_type": "click", "box_2d": [[900, 900, 999, 999]]}).reward == 0.0  # 0-999
    assert reward("gui", edge, {"action_type": "click", "box_2d": [[900, 900, 999, 999]], "grid": 1000}).reward == 1.0
    assert reward("gui", edge, dict(on_1000, box=[900, 900, 999, 999], grid=999)).reward == 0.0
    with pytest.raises(ValueError, match="0-999 grid"):
        reward("gui", edge, {"action_type": "click", "box_2d": [[900, 900, 1000, 1000]]})
    for grid in ("999", 0, True, 999.0):
        with pytest.raises(ValueError, match="grid must be a positive integer"):
            reward("gui", edge, dict(AW, grid=grid))


def test_gui_android_world_reference_errors():
    for bad in ({"action_type": "click", "action": "click"}, {"action_type": 3},
                {"action_type": "click", "box_2d": [100, 100, 200, 200]},
                {"action_type": "click", "box_2d": [[200, 200, 100, 100]]},
                {"action_type": "type", "text": 3}, [AW]):
        with pytest.raises(ValueError, match="gui answer"):
            reward("gui", "{}", bad)


# ---- grounding: bracket styles
STYLES = ["[100, 100, 200, 200]", "[[100, 100, 200, 200]]", "(100, 100, 200, 200)", "<100,100,200,200>"]
WRONG = ["[500, 500, 600, 600]", "[[500,500,600,600]]", "(500, 500, 600, 600)", "<500,500,600,600>"]


@pytest.mark.parametrize("answer", STYLES + [[[100, 100, 200, 200]]])
def test_grounding_bracket_styles(answer):
    for box in STYLES:
        assert reward("grounding", box, answer).reward == 1.0, box
    for box in WRONG:
        assert reward("grounding", box, answer).reward == 0.0, box
    for box in ("(100, 100, 200, 200]", "<100, 100, 200, 200)", "[100, 100, 200, 200>", "((100, 100, 200, 200))",
                "<100, 100, 200>", "(100, 100, 200, 200) or (500, 500, 600, 600)", "box (100, 100, 200, 200)"):
        assert reward("grounding", box, answer).reward == 0.0, box


def test_grounding_several_boxes_in_bracket_styles():
    answer = "(0, 0, 10, 10), (500, 500, 600, 600)"
    assert reward("grounding", "<500,500,600,600>, <0,0,10,10>", answer).reward == 1.0
    assert reward("grounding", "[(0, 0, 10, 10), (500, 500, 600, 600)]", answer).reward == 1.0
    assert reward("grounding", "(0, 0, 10, 10)", answer).reward == 0.5
    for bad in ("(1, 2, 3, 4]", "<1, 2, 3, 4", "(1, 2, 3)", "(20, 20, 10, 10)"):
        with pytest.raises(ValueError, match="grounding answer"):
            reward("grounding", "[0, 0, 1, 1]", bad)


# ---- chart: GLM-V's tolerance as an option
def test_chart_glmv_tolerance():
    glmv = {"chart_rel_tol": chart.GLMV_REL_TOL}
    assert chart.GLMV_REL_TOL == 0.025 and RewardConfig().chart_rel_tol == 0.02
    assert reward("chart", "102.4", "100").reward == 0.0
    assert reward("chart", "102.4", "100", **glmv).reward == 1.0
    assert reward("chart", "97.6%", "100", **glmv).reward == 1.0
    assert reward("chart", "102.6", "100", **glmv).reward == 0.0
    assert reward("chart", "2019", "2020", **glmv).reward == 0.0  # years stay exact


# ---- no new way in
@pytest.mark.parametrize("domain, good, answer, wrong", [
    ("gui", json.dumps(AW), AW, json.dumps({"action_type": "type", "text": "x"})),
    ("gui", json.dumps(OURS), AW, json.dumps({"action_type": "click", "box_2d": [[500, 500, 600, 600]]})),
    ("grounding", "(100, 100, 200, 200)", "<100, 100, 200, 200>", "(500, 500, 600, 600)"),
    ("grounding", "<100,100,200,200>", [[100, 100, 200, 200]], "<500,500,600,600>"),
])
def test_hostile_inputs_in_the_new_forms(domain, good, answer, wrong):
    assert reward(domain, good, answer).reward == 1.0
    for name, response in structural_attacks(good, wrong).items():
        assert compute_reward(domain, response, answer).reward == 0.0, name
    for name, response in hedges(good, wrong).items():
        expected = 0.5 if domain == "grounding" and name == "comma_list" else 0.0  # two boxes: 1 of 2 matched
        assert compute_reward(domain, response, answer).reward == expected, name
