"""choice, counting, chart, ocr, grounding, gui: positive and negative cases, reference validation."""
import json

import pytest

from glmv_jax.rewards import RewardConfig, compute_reward
from glmv_jax.rewards.boxes import count_matches, iou, parse_boxes
from tests.rewards.helpers import respond


def reward(domain, box, answer, style="glm41v", **config):
    return compute_reward(domain, respond(box, style), answer, style=style, config=RewardConfig(**config)).reward


# ---- choice
@pytest.mark.parametrize("box, answer, expected", [
    ("B", "B", 1.0), ("(B)", "B", 1.0), ("b", "B", 1.0), ("B.", "B", 1.0),
    ("A, C", "A,C", 1.0), ("C A", "A,C", 1.0), ("AC", ["A", "C"], 1.0), ("A;C", "C, A", 1.0),
    ("A", "A,C", 0.0), ("A,B,C", "A,C", 0.0), ("A,B,C,D", "B", 0.0), ("ABCD", "B", 0.0),
    ("A or B", "B", 0.0), ("B) Paris", "B", 0.0), ("B,B", "B", 0.0), ("Paris", "B", 0.0),
])
def test_choice(box, answer, expected):
    assert reward("choice", box, answer) == expected


def test_choice_reference_errors():
    for bad in ("", "Paris", 3, ["AB"]):
        with pytest.raises(ValueError, match="choice answer must be letters"):
            reward("choice", "A", bad)


# ---- counting
@pytest.mark.parametrize("box, answer, expected", [
    ("3", 3, 1.0), ("three", 3, 1.0), ("Three", "3", 1.0), ("1,200", 1200, 1.0), ("12", "12", 1.0),
    ("4", 3, 0.0), ("3.0", 3, 0.0), ("3 apples", 3, 0.0), ("3 or 4", 3, 0.0), ("about 3", 3, 0.0),
    ("a number between 0 and 10", 3, 0.0), ("3-4", 3, 0.0), ("thirty", 30, 0.0),
])
def test_counting(box, answer, expected):
    assert reward("counting", box, answer) == expected


def test_counting_reference_errors():
    for bad in ("three", "3.5", True, None):
        with pytest.raises(ValueError, match="counting answer must be an integer"):
            reward("counting", "3", bad)


# ---- chart
@pytest.mark.parametrize("box, answer, expected", [
    ("101.9", "100", 1.0), ("98.1", 100, 1.0), ("102.1", "100", 0.0), ("97.9", "100", 0.0),
    ("45%", "45", 1.0), ("45", "45\\%", 1.0), ("1,234", "1234", 1.0), ("0", "0", 1.0), ("0.01", "0", 0.0),
    ("2019", "2019", 1.0), ("2020", "2019", 0.0), ("2019.5", 2019, 0.0),  # years: exact
    ("2,019", "2,019", 1.0), ("2,070", "2,019", 0.0),  # "2,019" is a quantity written with a separator: 2%
    ("2,040", "2,019", 1.0), ("2,050", "2,019", 1.0),
    ("North  america", "North America", 1.0), ("Europe", "North America", 0.0),
    ("100 or 101", "100", 0.0), ("about 100", "100", 0.0),
])
def test_chart(box, answer, expected):
    assert reward("chart", box, answer) == expected


def test_chart_reference_errors():
    for bad in (None, [1], "  "):
        with pytest.raises(ValueError, match="chart answer"):
            reward("chart", "1", bad)


# ---- ocr
def test_ocr_is_one_minus_normalized_edit_distance():
    assert reward("ocr", "Hello world", "Hello world") == 1.0
    assert reward("ocr", "Hello  world", "Hello world") == 1.0  # whitespace runs collapse
    assert reward("ocr", "Hel1o", "Hello") == pytest.approx(0.8)  # 1 substitution / 5
    assert reward("ocr", "Hell", "Hello") == pytest.approx(0.8)  # 1 deletion / max(4, 5)
    assert reward("ocr", "hello", "Hello") == pytest.approx(0.8)
    assert reward("ocr", "hello", "Hello", ocr_ignore_case=True) == 1.0
    assert reward("ocr", "xyz", "Hello") == 0.0
    assert reward("ocr", "43.0", "43") == pytest.approx(0.5)  # OCR is not math
    with pytest.raises(ValueError, match="ocr answer must be a non-empty string"):
        reward("ocr", "x", "")


# ---- grounding
def test_iou_and_matching():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0
    # one prediction overlapping two references matches only one of them
    assert count_matches([[0, 0, 100, 100]], [[0, 0, 100, 90], [0, 10, 100, 100]], 0.5) == 1
    # greedy would pair p0 with r0 and leave p1 unmatched; the optimum matches both
    refs = [[0, 0, 100, 100], [0, 0, 100, 60]]
    assert count_matches([[0, 0, 100, 80], [0, 0, 100, 100]], refs, 0.5) == 2
    assert count_matches([[10, 10, 5, 5]], [[0, 0, 10, 10]], 0.5) == 0  # invalid box


@pytest.mark.parametrize("box, answer, expected", [
    ("[100, 100, 200, 200]", [[100, 100, 200, 200]], 1.0),
    ("[[100,100,200,200]]", [100, 100, 200, 200], 1.0),
    ("[102, 98, 205, 199]", "[[100, 100, 200, 200]]", 1.0),
    ("[[0,0,10,10],[500,500,600,600]]", [[500, 500, 600, 600], [0, 0, 10, 10]], 1.0),
    ("[0,0,10,10], [500,500,600,600]", [[500, 500, 600, 600], [0, 0, 10, 10]], 1.0),
    ("[[0,0,10,10]]", [[500, 500, 600, 600], [0, 0, 10, 10]], 0.5),
    ("[[0,0,10,10],[100,100,110,110]]", [[0, 0, 10, 10]], 0.5),
    ("[150, 100, 250, 200]", [[100, 100, 200, 200]], 0.0),  # IoU 1/3
    ("[0, 0, 1000, 1000]", [[100, 100, 200, 200]], 0.0),
    ("[100, 100, 200]", [[100, 100, 200, 200]], 0.0),
    ("[100, 100, 200, 200] or [0, 0, 5, 5]", [[100, 100, 200, 200]], 0.0),
    ("the box [100, 100, 200, 200]", [[100, 100, 200, 200]], 0.0),
])
def test_grounding(box, answer, expected):
    assert reward("grounding", box, answer) == pytest.approx(expected)


def test_grounding_spraying_boxes_earns_little_or_nothing():
    answer = [[100, 100, 200, 200]]
    grid = [[x, y, x + 100, y + 100] for x in range(0, 1000, 100) for y in range(0, 1000, 100)]
    assert reward("grounding", json.dumps(grid), answer) == pytest.approx(1 / 100)
    assert reward("grounding", json.dumps(grid + [[0, 0, 5, 5]]), answer) == 0.0  # > max_boxes
    assert parse_boxes(json.dumps(grid + [[0, 0, 5, 5]]), max_boxes=100) is None


def test_grounding_reference_errors():
    for bad in ("[1, 2, 3]", "nope", [[10, 10, 5, 5]], [[0, 0, 1001, 10]], []):
        with pytest.raises(ValueError, match="grounding answer"):
            reward("grounding", "[0,0,1,1]", bad)


# ---- gui
CLICK = {"action": "click", "box": [100, 100, 200, 200]}
TYPE = {"action": "type", "text": "hello world"}


@pytest.mark.parametrize("action, answer, expected", [
    ({"action": "click", "box": [105, 100, 205, 200]}, CLICK, 1.0),
    ({"box": [100, 100, 200, 200], "action": "click"}, json.dumps(CLICK), 1.0),
    ({"action": "type", "text": " hello  world "}, TYPE, 1.0),
    ({"action": "click", "box": [300, 300, 400, 400]}, CLICK, 0.0),
    ({"action": "type", "box": [100, 100, 200, 200]}, CLICK, 0.0),
    ({"action": "click", "box": [100, 100, 200, 200]}, TYPE, 0.0),
    ({"action": "type", "text": "Hello world"}, TYPE, 0.0),
    ({"action": "click", "box": [100, 100, 200, 200], "also": "type"}, CLICK, 0.0),
    ({"action": "click"}, CLICK, 0.0),
    ([CLICK], CLICK, 0.0),
    ([CLICK, TYPE], CLICK, 0.0),
    ({"action": "click", "box": [200, 200, 100, 100]}, CLICK, 0.0),
    ({"action": "click", "box": "[100, 100, 200, 200]"}, CLICK, 0.0),
    ({"action": "scroll", "direction": "down"}, {"action": "scroll", "direction": "down"}, 1.0),
    ({"action": "scroll", "direction": "up"}, {"action": "scroll", "direction": "down"}, 0.0),
])
def test_gui(action, answer, expected):
    assert reward("gui", json.dumps(action), answer) == expected


@pytest.mark.parametrize("box", [
    "click [100, 100, 200, 200]", "{'action': 'click', 'box': [100, 100, 200, 200]}",
    json.dumps(CLICK) + " " + json.dumps(TYPE), "[" * 100_000, '{"action": "click", "box": [NaN, 0, 1, 1]}',
])
def test_gui_malformed_actions(box):
    assert reward("gui", box, CLICK) == 0.0


def test_gui_reference_errors():
    for bad in ("click", {"box": [0, 0, 1, 1]}, {"action": "click", "box": [0, 0, 0, 0]},
                {"action": "type", "text": 3}):
        with pytest.raises(ValueError, match="gui answer"):
            reward("gui", "{}", bad)


@pytest.mark.parametrize("style", ["glm45v", "glm46v", "glm45v_nothink"])
def test_every_domain_in_the_glm45v_styles(style):
    assert reward("choice", "B", "B", style) == 1.0
    assert reward("counting", "4", 4, style) == 1.0
    assert reward("chart", "12.1", "12", style) == 1.0
    assert reward("ocr", "abc", "abc", style) == 1.0
    assert reward("grounding", "[1, 1, 9, 9]", [[1, 1, 9, 9]], style) == 1.0
    assert reward("gui", json.dumps(CLICK), CLICK, style) == 1.0
    assert reward("math", "1/2", "0.5", style) == 1.0
