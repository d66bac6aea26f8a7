"""Tool registry and execute(call, images) -> Observation, which never raises (docs/tools.md section 2).

Checks, in order, each failure an Observation with `error` set to its reason code:
  unknown_tool       no tool of that name in the registry
  invalid_call       the call is not a name + dict of arguments
  invalid_json       an argument the schema types as array / object / number / integer / boolean / null
                     came as text that is not JSON
  invalid_arguments  the arguments fail the tool's JSON schema (jsonschema, draft 2020-12)
  timeout            the tool ran past its time_limit_s
  <tool's own code>  the tool refused the input (ToolInputError: crop's box_outside_image, empty_box,
                     no_such_image; calculator's expression_too_long, not_arithmetic, ...)
  tool_error         the tool raised anything else or returned neither text nor an image (a bug)
Before the schema check, an argument the schema types as string takes its verbatim text
(ToolCall.raw_arguments), so {"expression": "42"} stays "42" although the parser decoded it to 42.

The time limit bounds how long execute waits: the tool runs in a daemon thread that is abandoned, not
killed, when it runs late, so tools must bound their own work (the built-in ones limit their inputs).
"""
from __future__ import annotations

import threading
from typing import Iterable, Sequence

import jsonschema
from PIL import Image

from glmv_jax.data.tool_calls import call_parts
from glmv_jax.tools import calculator, crop
from glmv_jax.tools.base import Observation, Tool, ToolInputError

_JSON_TYPES = ("array", "object", "number", "integer", "boolean", "null")


class Registry:
    """Tools by name."""

    def __init__(self, tools: Iterable[Tool] = ()):
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        """Add `tool`; raises for a taken name, an invalid schema or a non-positive time limit."""
        if not isinstance(tool, Tool) or not tool.name or tool.name in self._tools:
            raise ValueError(f"need a Tool with a new, non-empty name, got {tool!r}")
        jsonschema.Draft202012Validator.check_schema(tool.parameters)
        if not tool.time_limit_s > 0:
            raise ValueError(f"tool {tool.name!r}: time_limit_s must be > 0, got {tool.time_limit_s}")
        self._tools[tool.name] = tool

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> tuple[str, ...]:
        return tuple(self._tools)

    def specs(self, names: Sequence[str] | None = None) -> list[dict]:
        """Function specs for the chat template's `tools` (all tools, or those named, in that order)."""
        return [self._tools[n].spec() for n in (self.names() if names is None else names)]


DEFAULT = Registry([crop.TOOL, calculator.TOOL])


def execute(call, images: Sequence[Image.Image] = (), registry: Registry = DEFAULT) -> Observation:
    """Run one call (a ToolCall, {"name", "arguments"} or {"function": {...}}) against the episode's images."""
    try:
        name, arguments = call_parts(call)
    except ValueError as error:
        return Observation(str(getattr(call, "name", "")), error="invalid_call", detail=str(error))
    tool = registry.get(name)
    if tool is None:
        return Observation(name, error="unknown_tool", detail=f"no tool {name!r}; available: "
                                                              f"{', '.join(registry.names())}")
    arguments = _with_string_texts(dict(arguments), getattr(call, "raw_arguments", {}), tool.parameters)
    problem = _schema_problem(arguments, tool.parameters)
    if problem is not None:
        return Observation(name, error=problem[0], detail=problem[1])
    return _run(tool, arguments, images)


def _property_types(schema: dict) -> dict[str, object]:
    return {k: p.get("type") for k, p in schema.get("properties", {}).items() if isinstance(p, dict)}


def _with_string_texts(arguments: dict, raw: dict, schema: dict) -> dict:
    for key, kind in _property_types(schema).items():
        if kind == "string" and key in arguments and not isinstance(arguments[key], str) and key in raw:
            arguments[key] = raw[key]
    return arguments


def _schema_problem(arguments: dict, schema: dict) -> tuple[str, str] | None:
    for key, kind in _property_types(schema).items():
        if kind in _JSON_TYPES and isinstance(arguments.get(key), str):
            return "invalid_json", f"argument {key!r} must be JSON ({kind}), got the text {arguments[key][:80]!r}"
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(arguments))
    if error is None:
        return None
    where = "".join(f"[{p!r}]" for p in error.absolute_path)
    return "invalid_arguments", f"arguments{where}: {error.message}"


def _run(tool: Tool, arguments: dict, images) -> Observation:
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = tool.fn(arguments, images)
        except Exception as error:  # reported, never raised
            outcome["error"] = error

    thread = threading.Thread(target=target, name=f"tool-{tool.name}", daemon=True)
    thread.start()
    thread.join(tool.time_limit_s)
    if thread.is_alive():
        return Observation(tool.name, error="timeout", detail=f"{tool.name} took longer than {tool.time_limit_s} s")
    error, result = outcome.get("error"), outcome.get("result")
    if isinstance(error, ToolInputError):
        return Observation(tool.name, error=error.reason, detail=str(error))
    if error is not None:
        return Observation(tool.name, error="tool_error", detail=f"{type(error).__name__}: {error}")
    if isinstance(result, str):
        return Observation(tool.name, text=result)
    if isinstance(result, Image.Image):
        return Observation(tool.name, image=result)
    return Observation(tool.name, error="tool_error", detail=f"{tool.name} returned {type(result).__name__}")
