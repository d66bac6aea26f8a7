"""What a tool is and what running one gives back (docs/tools.md section 2)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from PIL import Image

ToolFn = Callable[[dict, Sequence[Image.Image]], "str | Image.Image"]


class ToolInputError(ValueError):
    """Raised by a tool function for arguments it cannot serve; `reason` is a short code for metrics."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Tool:
    """name and description as the model sees them in the tools block; parameters: the JSON schema of the
    arguments object; fn(arguments, episode images) -> text or image, pure (it must not change the images);
    time_limit_s: how long execute waits for it."""
    name: str
    description: str
    parameters: dict
    fn: ToolFn
    time_limit_s: float = 1.0

    def spec(self) -> dict:
        """The function spec for the chat template's `tools` list."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclasses.dataclass(frozen=True)
class Observation:
    """A tool's result: text or image on success; on failure `error` holds the reason code and `detail`
    the message the model reads."""
    tool: str
    text: str | None = None
    image: Image.Image | None = None
    error: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    def message(self) -> dict:
        """The `tool` turn for the chat template (an image result needs glm46v)."""
        if self.error is not None:
            return {"role": "tool", "content": f"Error ({self.error}): {self.detail}"}
        if self.image is not None:
            return {"role": "tool", "content": [{"type": "image", "image": self.image}]}
        return {"role": "tool", "content": self.text}
