"""The tool registry: crop and calculator on good input, and every bad input as an error observation with its
reason code (execute never raises)."""
import time

import pytest
from PIL import Image

from glmv_jax.data import chat_template as ct
from glmv_jax.data.tool_calls import ToolCall, parse_tool_calls
from glmv_jax.tools import DEFAULT, Observation, Registry, Tool, ToolInputError, execute
from glmv_jax.tools import calculator, crop

QUADRANTS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0))  # top-left, top-right, bottom-left, bottom-right


def quadrant_image(width=200, height=100) -> Image.Image:
    image = Image.new("RGB", (width, height))
    for k, colour in enumerate(QUADRANTS):
        x, y = (k % 2) * width // 2, (k // 2) * height // 2
        image.paste(colour, (x, y, x + width // 2, y + height // 2))
    return image


def calc(expression, raw=None) -> Observation:
    return execute(ToolCall("calculator", {"expression": expression},
                            {} if raw is None else {"expression": raw}))


# -- calculator ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("expression,value", [
    ("1+2*3", "7"), ("(12.5 + 3) * 4 / 2", "31"), ("7 // 2", "3"), ("7 % 3", "1"), ("-2**2", "-4"), ("--1", "1"),
    ("2 ** -1", "0.5"), ("1/3", "0.333333333333"), ("  3 ", "3"), ("1_000 + 1", "1001"), ("0.1 + 0.2", "0.3"),
    ("9 ** 99", str(9 ** 99)), ("-(4 - 10) % 4", "2"), ("1e3 * 2", "2000")])
def test_calculator(expression, value):
    assert calc(expression) == Observation("calculator", text=value)


@pytest.mark.parametrize("expression,reason", [
    ("1+" * 150 + "1", "expression_too_long"),
    ("__import__('os').system('true')", "not_arithmetic"), ("x + 1", "not_arithmetic"), ("2 ^ 3", "not_arithmetic"),
    ("1 < 2", "not_arithmetic"), ("abs(-1)", "not_arithmetic"), ("(1).real", "not_arithmetic"),
    ("1j", "not_arithmetic"), ("True + 1", "not_arithmetic"), ("", "not_arithmetic"), ("1,000", "not_arithmetic"),
    ("'a' * 3", "not_arithmetic"), ("[1] * 3", "not_arithmetic"), ("lambda: 1", "not_arithmetic"),
    ("2 +", "not_arithmetic"), ("2 + 2 =", "not_arithmetic"),
    ("2 ** 101", "exponent_too_large"), ("2 ** -101", "exponent_too_large"), ("2 ** 2 ** 10", "exponent_too_large"),
    ("10 ** 100 * 10", "result_too_large"), ("9.9e99 * 2", "result_too_large"), ("1e101", "result_too_large"),
    ("1e308 * 10", "result_too_large"), ("1e-90 ** -2", "result_too_large"), ("12 ** 99", "result_too_large"),
    ("1 / 0", "division_by_zero"), ("1 % 0", "division_by_zero"), ("0 ** -1", "division_by_zero"),
    ("(-8) ** 0.5", "not_real")])
def test_calculator_refuses(expression, reason):
    obs = calc(expression)
    assert obs.error == reason and obs.text is None and obs.detail


def test_calculator_string_argument_kept_as_text():
    """The parser decodes "42" to 42; the schema types expression as a string, so its text is used."""
    (call,) = parse_tool_calls("<tool_call>calculator\n<arg_key>expression</arg_key>\n<arg_value>42</arg_value>\n"
                               "</tool_call>")
    assert call.arguments == {"expression": 42} and execute(call).text == "42"
    assert calc(42).error == "invalid_arguments"  # no verbatim text to fall back on


# -- crop ----------------------------------------------------------------------------------------------------
def test_crop_cuts_and_enlarges():
    image = quadrant_image()
    obs = execute(ToolCall("crop", {"box": [500, 0, 1000, 500]}), [image])
    assert obs.ok and obs.text is None
    assert obs.image.size == (400, 200)  # 100 x 50 px scaled 4x (MAX_SCALE)
    assert set(obs.image.getdata()) == {QUADRANTS[1]}
    bottom_left = execute(ToolCall("crop", {"box": [0, 500, 500, 1000], "image": 1}), [Image.new("RGB", (8, 8)), image])
    assert set(bottom_left.image.getdata()) == {QUADRANTS[2]}
    large = execute(ToolCall("crop", {"box": [0, 0, 1000, 1000]}), [quadrant_image(2000, 1000)])
    assert large.image.size == (2000, 1000)  # already large enough: returned as cut
    thin = execute(ToolCall("crop", {"box": [0, 0, 1000, 10]}), [quadrant_image(1000, 1000)])
    assert thin.image.size == (1344, 13)  # the longer side is capped at MAX_SIDE
    assert crop.pixel_box([0.05, 0, 10.5, 999.9], 200, 100) == (0, 0, 3, 100)  # outward to whole pixels


@pytest.mark.parametrize("arguments,reason", [
    ({"box": [-1, 0, 500, 500]}, "box_outside_image"), ({"box": [0, 0, 1001, 500]}, "box_outside_image"),
    ({"box": [100, 100, 100, 200]}, "empty_box"), ({"box": [300, 100, 200, 200]}, "empty_box"),
    ({"box": [0, 0, 500, 500], "image": 1}, "no_such_image"),
    ({"box": "[1, 2, 3"}, "invalid_json"), ({"box": [1, 2, 3]}, "invalid_arguments"),
    ({"box": ["a", 2, 3, 4]}, "invalid_arguments"), ({"box": [1, 2, 3, 4], "zoom": 2}, "invalid_arguments"),
    ({"box": [1, 2, 3, 4], "image": -1}, "invalid_arguments"), ({}, "invalid_arguments")])
def test_crop_refuses(arguments, reason):
    obs = execute(ToolCall("crop", arguments), [quadrant_image()])
    assert obs.error == reason and obs.image is None and obs.detail


# -- execute and the registry ----------------------------------------------------------------------------------
def test_execute_call_forms_and_bad_calls():
    assert execute({"name": "calculator", "arguments": {"expression": "2+2"}}).text == "4"
    openai_style = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "1"}}}
    assert execute(openai_style).text == "1"
    assert execute(ToolCall("search", {"q": "x"})).error == "unknown_tool"
    for bad in (None, 3, {"name": 5, "arguments": {}}, {"name": "crop", "arguments": "[1, 2, 3, 4]"},
                ToolCall("crop", None)):
        assert execute(bad).error == "invalid_call"


def _slow(arguments, images):
    time.sleep(0.5)
    return "late"


def _picky(arguments, images):
    raise ToolInputError("nope", "cannot serve that")


def test_timeout_and_tool_errors():
    schema = {"type": "object"}
    registry = Registry([Tool("slow", "", schema, _slow, time_limit_s=0.05),
                         Tool("broken", "", schema, lambda a, i: 1 / 0),
                         Tool("odd", "", schema, lambda a, i: 42),
                         Tool("picky", "", schema, _picky)])
    start = time.perf_counter()
    assert execute(ToolCall("slow", {}), registry=registry).error == "timeout"
    assert time.perf_counter() - start < 0.4
    broken = execute(ToolCall("broken", {}), registry=registry)
    assert broken.error == "tool_error" and "ZeroDivisionError" in broken.detail
    assert execute(ToolCall("odd", {}), registry=registry).error == "tool_error"
    assert execute(ToolCall("picky", {}), registry=registry).error == "nope"
    assert execute(ToolCall("calculator", {"expression": "1"}), registry=registry).error == "unknown_tool"


def test_register_errors():
    registry = Registry([calculator.TOOL])
    with pytest.raises(ValueError, match="new, non-empty name"):
        registry.register(calculator.TOOL)
    with pytest.raises(Exception, match="nonsense"):
        registry.register(Tool("t", "", {"type": "nonsense"}, _slow))
    with pytest.raises(ValueError, match="time_limit_s"):
        registry.register(Tool("t", "", {"type": "object"}, _slow, time_limit_s=0))
    assert DEFAULT.names() == ("crop", "calculator")
    assert DEFAULT.specs(["calculator"]) == [calculator.TOOL.spec()]


def test_observations_render_as_tool_turns():
    """model text -> calls -> observations -> tool turns the GLM-4.6V template renders."""
    text = ("<think>zoom, then add</think>\n<tool_call>crop\n<arg_key>box</arg_key>\n<arg_value>[0, 0, 500, 500]"
            "</arg_value>\n</tool_call>\n<tool_call>calculator\n<arg_key>expression</arg_key>\n<arg_value>2+"
            "</arg_value>\n</tool_call>")
    calls = parse_tool_calls(text)
    observations = [execute(call, [quadrant_image()]) for call in calls]
    assert [o.ok for o in observations] == [True, False]
    msgs = [{"role": "user", "content": "<image>Colour of the top-left?"},
            {"role": "assistant", "content": "<think>zoom, then add</think>", "tool_calls": calls}]
    msgs += [o.message() for o in observations]
    rendered = ct.render(msgs, "glm46v", add_generation_prompt=True, tools=DEFAULT.specs())
    assert rendered.endswith("<|observation|>\n<tool_response>\n<|begin_of_image|><|image|><|end_of_image|>\n"
                             "</tool_response>\n<tool_response>\nError (not_arithmetic): not an arithmetic "
                             "expression: '2+'\n</tool_response>\n<|assistant|>\n")
    assert ct.count_media(msgs) == (2, 0)
