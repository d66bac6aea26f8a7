"""GLM-4.5V / 4.6V tool-call text: the tools block of the system header, assistant calls as the released
templates render them, and the parser of calls in model text (docs/tools.md section 1).

A call renders as `\\n<tool_call>{name}\\n` + `<arg_key>{k}</arg_key>\\n<arg_value>{v}</arg_value>\\n` per
argument + `</tool_call>`, where a string value is written verbatim and any other value as JSON
(`json.dumps(v, ensure_ascii=False)`, the template's `tojson`). The parser reads the values back as JSON
when they parse, else as strings, and keeps the verbatim texts in `ToolCall.raw_arguments` (a string
argument that looks like JSON, "42", comes back as 42; a schema that declares it a string takes the text).
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping, Sequence

TOOLS_HEADER = ("<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
TOOLS_FOOTER = ("</tools>\n\nFor each function call, output the function name and arguments within the following "
                "XML format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}"
                "</arg_value>\n<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
KEY_OPEN, KEY_CLOSE = "<arg_key>", "</arg_key>"
VALUE_OPEN, VALUE_CLOSE = "<arg_value>", "</arg_value>"
_TAGS = re.compile(r"(</?tool_call>|</?arg_key>|</?arg_value>)")
# reason codes of ToolCallError (for metrics)
REASONS = ("missing_name", "unbalanced_tags", "duplicate_arg_key", "bad_structure")


class ToolCallError(ValueError):
    """Malformed tool-call text; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call: the tool's name and its arguments (values decoded as JSON where they parse)."""
    name: str
    arguments: dict[str, Any]
    raw_arguments: dict[str, str] = dataclasses.field(default_factory=dict, compare=False, repr=False)


# -- rendering ----------------------------------------------------------------------------------------
def tools_block(tools: Sequence[Mapping]) -> str:
    """The `<|system|>\\n# Tools ...` block the templates put first when `tools` is non-empty."""
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools):
        raise ValueError(f"tools must be a list of dicts (JSON function specs), got {tools!r}")
    return TOOLS_HEADER + "".join(_to_json(dict(t)) + "\n" for t in tools) + TOOLS_FOOTER


def format_tool_calls(calls: Sequence) -> str:
    """Assistant calls as the templates append them after the turn's content."""
    out = []
    for call in calls:
        name, arguments = call_parts(call)
        out.append(f"\n{CALL_OPEN}{name}\n")
        for key, value in arguments.items():
            text = value if isinstance(value, str) else _to_json(value)
            out.append(f"{KEY_OPEN}{key}{KEY_CLOSE}\n{VALUE_OPEN}{text}{VALUE_CLOSE}\n")
        out.append(CALL_CLOSE)
    return "".join(out)


def call_parts(call) -> tuple[str, Mapping]:
    """(name, arguments) of a ToolCall, {"name", "arguments"} or OpenAI-style {"function": {...}} (the
    templates read `tc.function` when it is set, then `.name` and `.arguments.items()`)."""
    if isinstance(call, Mapping) and call.get("function"):
        call = call["function"]
    if isinstance(call, Mapping):
        name, arguments = call.get("name"), call.get("arguments")
    else:
        name, arguments = getattr(call, "name", None), getattr(call, "arguments", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"a tool call needs a non-empty string name, got {call!r}")
    if not isinstance(arguments, Mapping) or not all(isinstance(k, str) for k in arguments):
        raise ValueError(f"tool call {name!r}: arguments must be a dict with string keys (decode OpenAI-style "
                         f"JSON strings first), got {arguments!r}")
    return name, arguments


def _to_json(value) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"not JSON-serializable: {value!r} ({error})") from None


# -- parsing ------------------------------------------------------------------------------------------
# parser states -> {tag: next state}; text is free outside calls, the name/key/value texts are read in their
# states, and anything but whitespace elsewhere inside a call is an error
_NEXT = {"out": {CALL_OPEN: "name"}, "name": {KEY_OPEN: "key", CALL_CLOSE: "out"},
         "args": {KEY_OPEN: "key", CALL_CLOSE: "out"}, "key": {KEY_CLOSE: "between"},
         "between": {VALUE_OPEN: "value"}, "value": {VALUE_CLOSE: "args"}}


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>...</tool_call>` in `text`, in order (text outside the calls is ignored; pass the
    part after the think block). Whitespace between tags is free, so the no-newline variant
    `<tool_call>f<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>` parses too. Raises ToolCallError
    for a missing or multi-word name, tags out of order or unclosed, a repeated or empty key, or stray text
    inside a call."""
    pieces = _TAGS.split(text)  # text, tag, text, tag, ..., text
    calls, state = [], "out"
    name = key = ""
    arguments: dict = {}
    raw: dict = {}
    for k in range(0, len(pieces), 2):
        chunk, tag = pieces[k], pieces[k + 1] if k + 1 < len(pieces) else None
        if state == "name":
            name, arguments, raw = _name(chunk), {}, {}
        elif state == "key":
            key = chunk
        elif state == "value":
            if not key:
                raise ToolCallError("bad_structure", f"tool call {name!r}: an empty argument key")
            if key in arguments:
                raise ToolCallError("duplicate_arg_key", f"tool call {name!r}: argument {key!r} given twice")
            arguments[key], raw[key] = _decode(chunk), chunk
        elif state != "out" and chunk.strip():
            raise ToolCallError("bad_structure", f"tool call {name!r}: stray text {chunk.strip()[:40]!r}")
        if tag is None:
            break
        if tag not in _NEXT[state]:
            where = "outside a tool call" if state == "out" else f"in tool call {name!r}"
            raise ToolCallError("unbalanced_tags", f"unexpected {tag} {where}")
        state = _NEXT[state][tag]
        if tag == CALL_CLOSE:
            calls.append(ToolCall(name, arguments, raw))
    if state != "out":
        raise ToolCallError("unbalanced_tags", f"tool call {name!r} is not closed with {CALL_CLOSE}")
    return calls


def _name(chunk: str) -> str:
    name = chunk.strip()
    if not name:
        raise ToolCallError("missing_name", "a tool call without a function name")
    if len(name.split()) != 1:
        raise ToolCallError("bad_structure", f"tool call name {name[:40]!r} is not one word")
    return name


def _decode(value: str):
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return value
