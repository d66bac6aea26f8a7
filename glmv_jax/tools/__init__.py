"""Tools a model can call during an episode (docs/tools.md): a registry of named tools with JSON-schema
arguments, and execute(call, images) -> Observation, which never raises.

    from glmv_jax.data.tool_calls import parse_tool_calls
    from glmv_jax.tools import DEFAULT, execute
    tools = DEFAULT.specs()                                  # for chat_template.render(..., tools=tools)
    obs = [execute(call, images) for call in parse_tool_calls(answer_text)]
    messages += [o.message() for o in obs]                   # tool turns (image results need glm46v)
"""
from glmv_jax.tools.base import Observation, Tool, ToolInputError
from glmv_jax.tools.registry import DEFAULT, Registry, execute

__all__ = ["DEFAULT", "Observation", "Registry", "Tool", "ToolInputError", "execute"]
