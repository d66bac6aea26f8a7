"""parse_tool_calls: what the chat templates render parses back to the same calls, and malformed call text
raises ToolCallError with its reason code."""
import json

import numpy as np
import pytest

from glmv_jax.data import chat_template as ct
from glmv_jax.data.tool_calls import REASONS, ToolCall, ToolCallError, format_tool_calls, parse_tool_calls

VALUES = ["a b", "é ü 中", "", "42", "[1, 2", "line\nbreak", '"quoted"', "true", 3, -1.5, 1e-7, True, False, None,
          [1, 2, 3, 4], {"a": [1, {"b": "c"}]}, [], "{}"]


def _decoded(value):
    """What the parser returns for a rendered value: JSON where the text parses, else the text."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def test_render_parse_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(200):
        calls = []
        for _ in range(int(rng.integers(1, 4))):
            keys = rng.choice(["box", "expression", "q", "k-2", "ключ"], int(rng.integers(0, 4)), replace=False)
            calls.append(ToolCall(str(rng.choice(["crop", "calculator", "web.search"])),
                                  {str(k): VALUES[rng.integers(len(VALUES))] for k in keys}))
        msgs = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "<think>t</think>ok", "tool_calls": calls}]
        for template in ("glm45v", "glm46v"):
            (output,) = [text for text, is_output in ct.render_segments(msgs, template) if is_output]
            parsed = parse_tool_calls(output)
            assert [p.name for p in parsed] == [c.name for c in calls]
            for p, c in zip(parsed, calls):
                assert list(p.arguments) == list(c.arguments)
                assert p.arguments == {k: _decoded(v) for k, v in c.arguments.items()}
                assert p.raw_arguments == {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                                           for k, v in c.arguments.items()}


def test_parse_variants():
    call = ToolCall("crop", {"box": [1, 2, 3, 4], "note": "x y"})
    assert parse_tool_calls(format_tool_calls([call])) == [call]
    compact = "<tool_call>crop<arg_key>box</arg_key><arg_value>[1,2,3,4]</arg_value><arg_key>note</arg_key>" \
              "<arg_value>x y</arg_value></tool_call>"
    assert parse_tool_calls(compact) == [call]
    spaced = "<tool_call> crop \n <arg_key>box</arg_key> \n<arg_value> [1, 2, 3, 4] </arg_value>\n\n" \
             "<arg_key>note</arg_key><arg_value>x y</arg_value>\n</tool_call>"
    assert parse_tool_calls(spaced) == [call]
    assert parse_tool_calls("<tool_call>calculator\n<arg_key>expression</arg_key>\n<arg_value>42</arg_value>\n"
                            "</tool_call>")[0].raw_arguments == {"expression": "42"}
    # GLM-4.1V style: the call inside the answer; prose around calls is ignored
    text = f"<think>zoom</think><answer>Let me look.{format_tool_calls([call, ToolCall('done', {})])} ok</answer>"
    assert parse_tool_calls(text) == [call, ToolCall("done", {})]
    assert parse_tool_calls("no calls, <b>html</b> and <tool_response>") == []


@pytest.mark.parametrize("text,reason", [
    ("<tool_call>\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>", "missing_name"),
    ("<tool_call>  </tool_call>", "missing_name"),
    ("<tool_call>crop\n<arg_key>a</arg_key><arg_value>1</arg_value>", "unbalanced_tags"),
    ("done</tool_call>", "unbalanced_tags"),
    ("<tool_call>f<tool_call>g</tool_call>", "unbalanced_tags"),
    ("<tool_call>f<arg_value>1</arg_value></tool_call>", "unbalanced_tags"),
    ("<tool_call>f<arg_key>a<arg_value>1</arg_value></tool_call>", "unbalanced_tags"),
    ("<tool_call>f<arg_key>a</arg_key><arg_value>1</tool_call>", "unbalanced_tags"),
    ("<tool_call>f<arg_key>a</arg_key></tool_call>", "unbalanced_tags"),
    ("<arg_key>a</arg_key><arg_value>1</arg_value>", "unbalanced_tags"),
    ("<tool_call>f<arg_key>a</arg_key><arg_value>1</arg_value><arg_key>a</arg_key><arg_value>2</arg_value>"
     "</tool_call>", "duplicate_arg_key"),
    ("<tool_call>look at the image</tool_call>", "bad_structure"),
    ("<tool_call>f<arg_key>a</arg_key> = <arg_value>1</arg_value></tool_call>", "bad_structure"),
    ("<tool_call>f<arg_key>a</arg_key><arg_value>1</arg_value> and then</tool_call>", "bad_structure"),
    ("<tool_call>f<arg_key></arg_key><arg_value>1</arg_value></tool_call>", "bad_structure"),
])
def test_malformed_calls(text, reason):
    with pytest.raises(ToolCallError) as error:
        parse_tool_calls(text)
    assert error.value.reason == reason and reason in REASONS


def test_format_errors():
    with pytest.raises(ValueError, match="name"):
        format_tool_calls([{"name": "", "arguments": {}}])
    with pytest.raises(ValueError, match="string keys"):
        format_tool_calls([ToolCall("f", {1: "a"})])
