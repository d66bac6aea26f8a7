"""Parse and validate one data record (docs/data.md section 1) into a normalized dict.

Record kinds and their fields (`id` is always required; `kind` is inferred when absent):

| kind | required fields | becomes |
|---|---|---|
| caption | images (>= 1), text | pretraining text: `<image>` per image, then the caption; loss on all text |
| interleaved | text with one `<image>` marker per entry of images | pretraining text; loss on all text |
| ocr | images (1), text | conversation: user asks to read the image, assistant answers `text` |
| grounding | images (1), query, boxes [[x1,y1,x2,y2], ...] (0-1000 grid) | conversation; answer = boxes in a box |
| video | video {frames: [file, ...], timestamps: [s, ...]}, messages or text with one `<video>` | either form |
| sft | messages with an assistant turn | conversation; loss on assistant turns |
| rl | messages without an assistant turn (answer, domain, difficulty kept) | a prompt |

Normalized record: {"id", "kind", "domain", "images": [PIL image | absolute path], "video": None |
{"frames": [...], "timestamps": [...]}, "text": str | None, "messages": list | None, "answer", "difficulty",
"where", "meta": the record's other fields (e.g. "tier")}. Exactly one of "text" (pretraining) and
"messages" (conversation) is set.

Image paths: relative ones resolve against the manifest's directory (`base_dir`); every path must resolve
(symlinks followed) inside the root, `data_root` when given, else `base_dir` (records without either, e.g.
in-memory ones, are not checked).

Bad records raise `BadRecordError(reason, where, message)`; the pipeline skips-and-counts them by `reason`
or re-raises, per `on_bad_record`. Reasons: invalid_utf8, invalid_json, missing_field, invalid_field,
placeholder_mismatch, path_outside_root, missing_image, unreadable_image, image_too_large, too_long,
too_many_patches (docs/data.md section 7).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import PIL.Image

KINDS = ("caption", "interleaved", "ocr", "grounding", "video", "sft", "rl")
ROLES = ("system", "user", "assistant")
IMAGE_MARK, VIDEO_MARK = "<image>", "<video>"
RAW_VISION_TOKENS = ("<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                     "<|end_of_video|>")
OCR_PROMPT = "Read all the text in the image."
GROUNDING_PROMPT = "Locate {query} in the image. Answer with boxes [x1, y1, x2, y2] on a 0-1000 grid."


_CONSUMED = {"id", "kind", "domain", "images", "video", "text", "messages", "answer", "difficulty", "prompt",
             "query", "boxes"}


class BadRecordError(ValueError):
    """A record that cannot be turned into a training example. `reason` is a short counter key."""

    def __init__(self, reason: str, where: str, message: str):
        super().__init__(f"bad record {where}: {reason}: {message}")
        self.reason, self.where, self.message = reason, where, message


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """A skipped record travelling down the pipeline to be counted (picklable, so it crosses workers)."""
    reason: str
    where: str
    message: str

    def error(self) -> BadRecordError:
        return BadRecordError(self.reason, self.where, self.message)


def decode_raw(raw: Any, where: str) -> dict:
    """str / UTF-8 bytes JSON or an already-decoded dict -> dict."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, (bytes, bytearray)):
        raw = decode_utf8(bytes(raw), where)
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRecordError("invalid_json", where, f"not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise BadRecordError("invalid_json", where, f"a JSON object expected, got {type(record).__name__}")
    return record


def decode_utf8(raw: bytes, where: str) -> str:
    """Strict UTF-8 (a leading BOM dropped); invalid bytes are a bad record, never silently replaced."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        where = _with_id(where, _id_hint(raw))
        raise BadRecordError("invalid_utf8", where, f"invalid UTF-8 byte {raw[e.start]:#04x} at byte {e.start} "
                                                     f"of the line") from None


def _id_hint(raw: bytes) -> Any:
    """The id of a line that is not valid UTF-8, if the rest of it parses (for the error message only)."""
    try:
        record = json.loads(raw.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    return record.get("id") if isinstance(record, dict) else None


def _with_id(where: str, rid: Any) -> str:
    return where if rid is None else f"{where} (id={rid})"


def parse_record(element: dict, data_root: str | None = None) -> dict:
    """A raw source element {"raw", "where", "base_dir"} -> normalized record (see the module doc).
    data_root: the folder image paths must resolve inside (default: the element's base_dir)."""
    where = element.get("where", "?")
    record = decode_raw(element["raw"], where)
    where = _with_id(where, record.get("id"))
    _require(record, "id", where)
    kind = record.get("kind") or infer_kind(record)
    if kind not in KINDS:
        raise BadRecordError("invalid_field", where, f"unknown kind {kind!r}; expected one of {KINDS}")
    paths = _Paths(element.get("base_dir"), data_root)
    images = [paths.ref(x, where) for x in _as_list(record.get("images", []), "images", where)]
    out = {"id": str(record["id"]), "kind": kind, "domain": record.get("domain"), "images": images,
           "video": None, "text": None, "messages": None, "answer": record.get("answer"),
           "difficulty": record.get("difficulty"), "where": where,
           "meta": {k: v for k, v in record.items() if k not in _CONSUMED}}
    if kind == "caption":
        text = _text(record, "text", where)
        _need_images(images, where, at_least=1)
        out["text"] = text if IMAGE_MARK in text else IMAGE_MARK * len(images) + text
    elif kind == "interleaved":
        out["text"] = _text(record, "text", where)
    elif kind == "ocr":
        _need_images(images, where, exactly=1)
        answer = _text(record, "text", where)
        out["messages"] = [{"role": "user", "content": IMAGE_MARK + record.get("prompt", OCR_PROMPT)},
                           {"role": "assistant", "content": answer}]
        out["answer"] = out["answer"] if out["answer"] is not None else answer
    elif kind == "grounding":
        _need_images(images, where, exactly=1)
        query = _text(record, "query", where)
        boxes = _boxes(record, where)
        out["messages"] = [{"role": "user", "content": IMAGE_MARK + GROUNDING_PROMPT.format(query=query)},
                           {"role": "assistant", "content": "<|begin_of_box|>" + json.dumps(boxes) + "<|end_of_box|>"}]
        out["answer"] = boxes
    elif kind == "video":
        out["video"] = _video(record, paths, where)
        if "messages" in record:
            out["messages"] = _messages(record, where)
        else:
            out["text"] = _text(record, "text", where)
    else:   # sft, rl
        out["messages"] = _messages(record, where)
        has_answer_turn = out["messages"][-1]["role"] == "assistant"
        if kind == "sft" and not any(m["role"] == "assistant" for m in out["messages"]):
            raise BadRecordError("invalid_field", where, "an sft record needs an assistant turn")
        if kind == "rl":
            if has_answer_turn:
                raise BadRecordError("invalid_field", where, "an rl record must end with a user turn (it is a prompt)")
            _require(record, "answer", where)
    _check_placeholders(out, where)
    return out


def infer_kind(record: dict) -> str:
    if "video" in record:
        return "video"
    if "messages" in record:
        msgs = record["messages"]
        has_assistant = isinstance(msgs, list) and any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs)
        return "sft" if has_assistant else "rl"
    if "query" in record or "boxes" in record:
        return "grounding"
    if "text" in record:
        text = record["text"]
        return "interleaved" if isinstance(text, str) and IMAGE_MARK in text else "caption"
    return "sft"   # then fails on the missing "messages" field, which is the most useful message


def count_marks(record: dict, mark: str) -> int:
    if record["text"] is not None:
        return record["text"].count(mark)
    return sum(m["content"].count(mark) for m in record["messages"])


# --------------------------------------------------------------------------- field checks


def _require(record: dict, name: str, where: str) -> Any:
    if name not in record or record[name] is None:
        raise BadRecordError("missing_field", where, f"required field {name!r} is missing")
    return record[name]


def _text(record: dict, name: str, where: str) -> str:
    value = _require(record, name, where)
    if not isinstance(value, str):
        raise BadRecordError("invalid_field", where, f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _as_list(value: Any, name: str, where: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise BadRecordError("invalid_field", where, f"field {name!r} must be a list, got {type(value).__name__}")
    return list(value)


@dataclasses.dataclass(frozen=True)
class _Paths:
    """Image references of one record: relative paths join base_dir (else data_root); every path must resolve,
    symlinks followed, inside data_root (else base_dir). Nothing is opened here."""
    base_dir: str | None
    data_root: str | None

    def ref(self, value: Any, where: str):
        """PIL images pass through; a string path -> its resolved path, checked against the root."""
        if isinstance(value, PIL.Image.Image):
            return value
        if not isinstance(value, str) or not value or "\0" in value:
            raise BadRecordError("invalid_field", where, f"an image must be a path or a PIL image, got {value!r:.60}")
        base = self.base_dir or self.data_root
        path = value if os.path.isabs(value) or base is None else os.path.join(base, value)
        root = self.data_root or self.base_dir
        if root is None:
            return path
        real, real_root = os.path.realpath(path), os.path.realpath(root)
        if os.path.commonpath([real, real_root]) != real_root:
            raise BadRecordError("path_outside_root", where,
                                 f"image path {value!r} resolves to {real}, outside {real_root} "
                                 f"(paths must stay inside the manifest's folder or data.data_root)")
        return real


def _need_images(images: list, where: str, at_least: int = 0, exactly: int | None = None) -> None:
    if exactly is not None and len(images) != exactly:
        raise BadRecordError("placeholder_mismatch", where, f"needs exactly {exactly} image(s), has {len(images)}")
    if len(images) < at_least:
        raise BadRecordError("missing_field" if not images else "invalid_field", where,
                             f"needs at least {at_least} image(s), has {len(images)}")


def _messages(record: dict, where: str) -> list[dict]:
    msgs = _as_list(_require(record, "messages", where), "messages", where)
    if not msgs:
        raise BadRecordError("invalid_field", where, "messages is empty")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRecordError("missing_field", where, f"messages[{i}] needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise BadRecordError("invalid_field", where, f"messages[{i}] has unknown role {m['role']!r}")
        if not isinstance(m["content"], str):
            raise BadRecordError("invalid_field", where, f"messages[{i}].content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _boxes(record: dict, where: str) -> list[list[float]]:
    boxes = _as_list(_require(record, "boxes", where), "boxes", where)
    for b in boxes:
        if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)):
            raise BadRecordError("invalid_field", where, f"a box must be 4 numbers [x1, y1, x2, y2], got {b!r}")
    return [list(b) for b in boxes]


def _video(record: dict, paths: _Paths, where: str) -> dict:
    video = record["video"]
    if not isinstance(video, dict):
        raise BadRecordError("invalid_field", where, "video must be {'frames': [...], 'timestamps': [...]}")
    frames = _as_list(_require(video, "frames", where), "video.frames", where)
    stamps = _as_list(_require(video, "timestamps", where), "video.timestamps", where)
    if not frames or len(frames) != len(stamps):
        raise BadRecordError("invalid_field", where,
                             f"video needs >= 1 frame and one timestamp per frame ({len(frames)} frames, "
                             f"{len(stamps)} timestamps)")
    if not all(isinstance(t, (int, float)) for t in stamps) or list(stamps) != sorted(stamps):
        raise BadRecordError("invalid_field", where, "video timestamps must be increasing numbers (seconds)")
    return {"frames": [paths.ref(f, where) for f in frames], "timestamps": [float(t) for t in stamps]}


def _check_placeholders(out: dict, where: str) -> None:
    texts = [out["text"]] if out["text"] is not None else [m["content"] for m in out["messages"]]
    for token in RAW_VISION_TOKENS:
        if any(token in t for t in texts):
            raise BadRecordError("placeholder_mismatch", where,
                                 f"literal {token} in the text; write {IMAGE_MARK} / {VIDEO_MARK} markers instead")
    n_image_marks = count_marks(out, IMAGE_MARK)
    if n_image_marks != len(out["images"]):
        raise BadRecordError("placeholder_mismatch", where,
                             f"{n_image_marks} {IMAGE_MARK} placeholder(s) but {len(out['images'])} image(s)")
    n_video_marks = count_marks(out, VIDEO_MARK)
    if n_video_marks != (1 if out["video"] is not None else 0):
        raise BadRecordError("placeholder_mismatch", where,
                             f"{n_video_marks} {VIDEO_MARK} placeholder(s) but {int(out['video'] is not None)} video(s)")
