"""GLM-V chat templates rendered in Python, text-identical to the hub Jinja templates
(docs/data.md section 3: GLM-4.1V-Thinking and GLM-4.5V / GLM-4.6V styles), and the
token-level training example (ids + loss mask) and RL prompt built from a data record (docs/data.md section 1).

Messages are dicts {"role", "content"[, "reasoning_content", "metadata", "tool_calls"]}. User/system content
is a string or a list of items {"type": "text", "text"}, {"type": "image"}, {"type": "video"}; in a string, the
record markers "<image>" / "<video>" stand for media items, so "<image>What?" renders like
[{"type": "image"}, {"type": "text", "text": "What?"}].

Tools (GLM-4.5V / 4.6V only; docs/tools.md): `tools=[spec, ...]` renders the tools block before everything
else, an assistant turn's `tool_calls` ([ToolCall | {"name", "arguments"} | {"function": {...}}]) follow its
content, and `tool` turns render as `<|observation|>` + `<tool_response>` blocks. A tool turn's content is a
string, or (glm46v) a list of text / image / video items whose media render as placeholders.
"""
from __future__ import annotations

import json
import re
from typing import Sequence

import numpy as np

from glmv_jax.data.tool_calls import format_tool_calls, tools_block

TEMPLATES = ("glm41v", "glm45v", "glm46v")  # glm46v renders as glm45v except tool results (media allowed)
STYLES = ("glm41v", "glm45v")               # response styles (docs/data.md section 3)
IMAGE_MARKER, VIDEO_MARKER = "<image>", "<video>"
IMAGE_PLACEHOLDER = "<|begin_of_image|><|image|><|end_of_image|>"
VIDEO_PLACEHOLDER = "<|begin_of_video|><|video|><|end_of_video|>"
BOX_OPEN, BOX_CLOSE = "<|begin_of_box|>", "<|end_of_box|>"
_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")


class ChatTemplateError(ValueError):
    """A conversation or record the templates cannot render."""


# -- responses -------------------------------------------------------------------------------------
def format_response(think: str, final: str, prefix: str = "", style: str = "glm41v") -> str:
    """The model's response with `final` boxed: GLM-4.1V `<think>t</think><answer>{prefix}<box>final</box></answer>`,
    GLM-4.5V/4.6V `<think>t</think>\\n{prefix}<box>final</box>` (no answer tags)."""
    boxed = f"{prefix}{BOX_OPEN}{final}{BOX_CLOSE}"
    if style == "glm41v":
        return f"<think>{think}</think><answer>{boxed}</answer>"
    if style == "glm45v":
        return f"<think>{think}</think>\n{boxed}"
    raise ChatTemplateError(f"unknown response style {style!r}; expected one of {STYLES}")


# -- content helpers -------------------------------------------------------------------------------
def split_media_markers(text: str) -> list[dict]:
    """"<image>What?" -> [{"type": "image"}, {"type": "text", "text": "What?"}]."""
    items = []
    for part in _MARKERS.split(text):
        if part == IMAGE_MARKER:
            items.append({"type": "image"})
        elif part == VIDEO_MARKER:
            items.append({"type": "video"})
        elif part:
            items.append({"type": "text", "text": part})
    return items


def count_media(messages: Sequence[dict]) -> tuple[int, int]:
    """(#images, #videos) in the user turns (markers in strings and media items) and in tool results (media
    items), as the templates render them."""
    images = videos = 0
    for msg in messages:
        content = msg.get("content")
        if msg.get("role") == "user":
            kinds = [_user_item_kind(item) for item in
                     (split_media_markers(content) if isinstance(content, str) else (content or []))]
        elif msg.get("role") == "tool" and isinstance(content, list):
            kinds = [_tool_item_kind(item) for item in content]
        else:
            continue
        images += kinds.count("image")
        videos += kinds.count("video")
    return images, videos


def _user_item_kind(item) -> str:
    """Item kind as the templates' user branch tests it (video before image)."""
    if not isinstance(item, dict):
        raise ChatTemplateError(f"content items must be dicts, got {item!r}")
    if item.get("type") == "video" or "video" in item:
        return "video"
    if item.get("type") == "image" or "image" in item:
        return "image"
    if item.get("type") == "text":
        if not isinstance(item.get("text"), str):
            raise ChatTemplateError(f"text item without a string 'text': {item!r}")
        return "text"
    raise ChatTemplateError(f"content item of unknown type: {item!r}")


def _user_text(content) -> str:
    """The user branch: markers/items -> placeholders, text verbatim."""
    items = split_media_markers(content) if isinstance(content, str) else content
    if not isinstance(items, list):
        raise ChatTemplateError(f"message content must be a string or a list of items, got {type(content).__name__}")
    out = []
    for item in items:
        kind = _user_item_kind(item)
        out.append(VIDEO_PLACEHOLDER if kind == "video" else IMAGE_PLACEHOLDER if kind == "image" else item["text"])
    return "".join(out)


def _tool_item_kind(item) -> str:
    """Item kind as GLM-4.6V's tool branch tests it: typed mappings by `type` (lowercased), else `output`."""
    if isinstance(item, str):
        return "string"
    if isinstance(item, dict) and isinstance(item.get("type"), str):
        kind = item["type"].lower()
        if kind == "text" and "text" in item:
            if not isinstance(item["text"], str):
                raise ChatTemplateError(f"tool result text item without a string 'text': {item!r}")
            return "text"
        return {"image": "image", "image_url": "image", "video": "video", "video_url": "video"}.get(kind, "json")
    if isinstance(item, dict) and "type" not in item and isinstance(item.get("output"), str):
        return "output"
    raise ChatTemplateError(f"tool result items must be strings, {{'output': str}} or dicts with a string 'type' "
                            f"(the template would print a Python repr), got {item!r}")


def _visible_text(content) -> str:
    """GLM-4.5V's `visible_text` macro (text items first, then image, then video)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatTemplateError(f"message content must be a string or a list of items, got {type(content).__name__}")
    out = []
    for item in content:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict) and item.get("type") == "text":
            out.append(item["text"])
        elif isinstance(item, dict) and (item.get("type") == "image" or "image" in item):
            out.append(IMAGE_PLACEHOLDER)
        elif isinstance(item, dict) and (item.get("type") == "video" or "video" in item):
            out.append(VIDEO_PLACEHOLDER)
        else:
            raise ChatTemplateError(f"content item of unknown type: {item!r}")
    return "".join(out)


# -- rendering -------------------------------------------------------------------------------------
def render_segments(messages: Sequence[dict], template: str = "glm41v", add_generation_prompt: bool = False,
                    enable_thinking: bool | None = None, tools: Sequence[dict] | None = None
                    ) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant_output) pieces; their concatenation is `render(...)`.
    Assistant output is the turn's content (and tool calls) after the `<|assistant|>\\n` header."""
    if template not in TEMPLATES:
        raise ChatTemplateError(f"unknown chat template {template!r}; expected one of {TEMPLATES}")
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise ChatTemplateError("messages must be a list of dicts")
    for msg in messages:
        if "role" not in msg or "content" not in msg:
            raise ChatTemplateError(f"message lacks 'role' or 'content': {msg!r}")
    if template == "glm41v":
        if enable_thinking is not None:
            raise ChatTemplateError("GLM-4.1V-Thinking has no enable_thinking switch")
        if tools or any(m.get("tool_calls") for m in messages):
            raise ChatTemplateError("GLM-4.1V-Thinking's template has no tools (it would drop them silently); "
                                    "use glm45v / glm46v")
        return _segments_41v(messages, add_generation_prompt)
    return _segments_45v(messages, add_generation_prompt, enable_thinking, tools, media_results=template == "glm46v")


def render(messages: Sequence[dict], template: str = "glm41v", add_generation_prompt: bool = False,
           enable_thinking: bool | None = None, tools: Sequence[dict] | None = None) -> str:
    """The exact text the hub template renders (transformers' apply_chat_template(tokenize=False))."""
    return "".join(text for text, _ in render_segments(messages, template, add_generation_prompt, enable_thinking,
                                                       tools))


def _segments_41v(messages, add_generation_prompt):
    segs = [("[gMASK]<sop>", False)]
    for msg in messages:
        role, content = msg["role"], msg["content"]
        if role == "system":
            if not isinstance(content, str):
                raise ChatTemplateError("GLM-4.1V system content must be a string")
            segs.append((f"<|system|>\n{content}", False))
        elif role == "user":
            segs.append(("<|user|>\n" + _user_text(content), False))
        elif role == "assistant":
            if not isinstance(content, str):
                raise ChatTemplateError("GLM-4.1V assistant content must be a string")
            segs.append((f"<|assistant|>{msg.get('metadata') or ''}\n", False))
            segs.append((content, True))
        else:
            raise ChatTemplateError(f"GLM-4.1V template has no role {role!r} (it would be dropped silently)")
    if add_generation_prompt:
        segs.append(("<|assistant|>\n", False))
    return segs


def _segments_45v(messages, add_generation_prompt, enable_thinking, tools, media_results):
    no_think = enable_thinking is not None and not enable_thinking
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    segs = [("[gMASK]<sop>", False)]
    if tools:
        segs.append((_checked(tools_block, tools), False))
    for index, msg in enumerate(messages):
        role, content = msg["role"], msg["content"]
        if role == "user":
            suffix = "/nothink" if no_think and not _visible_text(content).endswith("/nothink") else ""
            segs.append(("<|user|>\n" + _user_text(content) + suffix, False))
        elif role == "assistant":
            calls = _checked(format_tool_calls, msg.get("tool_calls") or [])
            segs.append(("<|assistant|>\n", False))
            segs.append((_assistant_45v(msg, keep_reasoning=index > last_user) + calls, True))
        elif role == "system":
            segs.append(("<|system|>\n" + _visible_text(content), False))
        elif role == "tool":
            first = index == 0 or messages[index - 1]["role"] != "tool"
            segs.append((_tool_result(content, first, media_results), False))
        else:
            raise ChatTemplateError(f"GLM-4.5V template has no role {role!r}")
    if add_generation_prompt:
        segs.append(("<|assistant|>\n" + ("<think></think>\n" if no_think else ""), False))
    return segs


def _tool_result(content, first: bool, media_results: bool) -> str:
    """A tool turn. String content: one `<tool_response>` block, `<|observation|>` only before the first of
    consecutive tool turns (GLM-4.6V's template adds a newline after it). List content: GLM-4.6V puts the
    items in one block (media as placeholders); GLM-4.5V opens `<|observation|>` and one block per item,
    printing strings and `output` texts only."""
    observation = "<|observation|>" if first else ""
    if isinstance(content, str):
        return f"{observation}\n<tool_response>\n{content}\n</tool_response>" + ("\n" if media_results else "")
    if not isinstance(content, list):
        raise ChatTemplateError(f"tool content must be a string or a list of items, got {type(content).__name__}")
    kinds = [_tool_item_kind(item) for item in content]
    if not media_results:
        if any(kind not in ("string", "output") for kind in kinds):
            raise ChatTemplateError("GLM-4.5V's template prints typed tool result items (text, images) as Python "
                                    "reprs; use strings / {'output': str}, or glm46v for media")
        return "<|observation|>" + "".join(f"\n<tool_response>\n{_tool_item_text(item, kind)}\n</tool_response>"
                                           for item, kind in zip(content, kinds))
    return f"{observation}\n<tool_response>\n" + "".join(
        _tool_item_text(item, kind) for item, kind in zip(content, kinds)) + "\n</tool_response>"


def _tool_item_text(item, kind: str) -> str:
    if kind == "string":
        return item
    if kind in ("image", "video"):
        return IMAGE_PLACEHOLDER if kind == "image" else VIDEO_PLACEHOLDER
    if kind == "json":  # a typed item the template does not know: its JSON
        return _checked(json.dumps, item, ensure_ascii=False)
    return item[kind]  # "text" / "output"


def _checked(fn, *args, **kwargs):
    """fn(...) with its ValueError / TypeError (a malformed tools list or call) as a ChatTemplateError."""
    try:
        return fn(*args, **kwargs)
    except (TypeError, ValueError) as error:
        raise ChatTemplateError(str(error)) from None


def _assistant_45v(msg: dict, keep_reasoning: bool) -> str:
    """Assistant turn after its header: reasoning only for turns after the last user turn."""
    content = _visible_text(msg["content"])
    reasoning = ""
    if isinstance(msg.get("reasoning_content"), str):
        reasoning = msg["reasoning_content"]
    elif "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        content = content.split("</think>")[-1].lstrip("\n")
    text = f"<think>{reasoning.strip()}</think>" if keep_reasoning and reasoning else "<think></think>"
    return text + ("\n" + content.strip() if content.strip() else "")


# -- tokens ----------------------------------------------------------------------------------------
def build_training_example(record: dict, tokenizer, template: str = "glm41v", *,
                           image_token_counts: int | Sequence[int] | None = None, max_length: int | None = None,
                           end_of_turn: str = "<|user|>", enable_thinking: bool | None = None,
                           tools: Sequence[dict] | None = None):
    """A data record (docs/data.md section 1) -> (input_ids [T] int32, loss_mask [T] int32).

    loss_mask[t] = 1 where input_ids[t] is a trained target: every assistant turn's content (not its
    `<|assistant|>\\n` header) plus the token that ends the turn, i.e. the first token of the next message
    (`<|user|>` / `<|observation|>`); after the last turn `end_of_turn` is appended and trained (the model
    learns to stop; it is one of the tokenizer's stop ids). GLM-4.5V/4.6V re-render assistant turns before the
    last user turn without their reasoning (`<think></think>`), and they are trained as rendered. Prompt and
    assistant segments are tokenized separately, so the ids before an answer are exactly `build_prompt`'s
    (what the model sees at inference); this equals tokenizing the whole text unless a BPE merge would
    cross a segment edge (e.g. content starting with a newline). `image_token_counts` expands each `<|image|>`
    to that many copies (int: the same for every image; list: per image, in order), as the processor does.
    `tools`: function specs rendered as the tools block (GLM-4.5V / 4.6V).
    """
    messages = _record_messages(record)
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatTemplateError(f"record {record.get('id')!r} has no assistant turn to train on")
    segs = render_segments(messages, template, enable_thinking=enable_thinking, tools=tools)
    ids, mask = [], []
    for text, is_target in _merge_segments(segs):
        piece = tokenizer.encode(text)
        if mask and mask[-1] and not is_target:  # the token that ends an assistant turn
            mask.append(1)
            ids.append(piece[0])
            piece = piece[1:]
        ids.extend(piece)
        mask.extend([int(is_target)] * len(piece))
    if segs[-1][1]:
        ids.append(tokenizer.token_to_id(end_of_turn))
        mask.append(1)
    ids, mask = _expand_images(ids, mask, tokenizer.image_id, image_token_counts, record)
    if max_length is not None and len(ids) > max_length:
        raise ChatTemplateError(f"record {record.get('id')!r} is {len(ids)} tokens, over max_length={max_length}")
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def build_prompt(record: dict, tokenizer, template: str = "glm41v", *,
                 image_token_counts: int | Sequence[int] | None = None, enable_thinking: bool | None = None,
                 tools: Sequence[dict] | None = None):
    """RL / eval prompt ids [T] int32: the messages up to the last user turn plus the generation prompt
    (a record's trailing assistant turns are dropped); `tools` as in build_training_example."""
    messages = _record_messages(record)
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ChatTemplateError(f"record {record.get('id')!r} has no user turn")
    text = render(messages[: users[-1] + 1], template, add_generation_prompt=True, enable_thinking=enable_thinking,
                  tools=tools)
    ids = tokenizer.encode(text)
    ids, _ = _expand_images(ids, [0] * len(ids), tokenizer.image_id, image_token_counts, record)
    return np.asarray(ids, np.int32)


def _record_messages(record: dict) -> list[dict]:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ChatTemplateError(f"a record needs a 'messages' list: {str(record)[:200]}")
    messages = record["messages"]
    if "images" in record:
        n_images, _ = count_media(messages)
        if n_images != len(record["images"]):
            raise ChatTemplateError(f"record {record.get('id')!r} has {n_images} image markers but "
                                    f"{len(record['images'])} images")
    return messages


def _merge_segments(segs):
    merged = []
    for text, flag in segs:
        if merged and merged[-1][1] == flag:
            merged[-1] = (merged[-1][0] + text, flag)
        elif text:
            merged.append((text, flag))
    return merged


def _expand_images(ids, mask, image_id, counts, record):
    if counts is None:
        return ids, mask
    n_images = sum(1 for i in ids if i == image_id)
    counts = [counts] * n_images if isinstance(counts, int) else list(counts)
    if len(counts) != n_images or any(int(c) < 1 for c in counts):
        raise ChatTemplateError(f"record {record.get('id')!r}: {n_images} <|image|> tokens but image_token_counts "
                                f"{counts}")
    out_ids, out_mask, k = [], [], 0
    for token, m in zip(ids, mask):
        repeat = int(counts[k]) if token == image_id else 1
        k += token == image_id
        out_ids.extend([token] * repeat)
        out_mask.extend([m] * repeat)
    return out_ids, out_mask
