"""Grain map transforms: raw source element -> one training sample (for `packing.py`) or one RL prompt.

Per record: parse + validate (`records.py`) -> load images / video frames with Pillow -> image and video
processors -> render + tokenize (chat template for conversations; `[gMASK]<sop>` + text for pretraining
text) -> expand `<|image|>` / `<|video|>` to the processor's token counts -> mm_token_type_ids ->
get_rope_index of the sample alone -> targets shifted inside the sample and the loss mask. Patch rows are
reordered into token-appearance order (images and video frames as their token runs come).

A bad record never raises here: the transform returns a `records.BadRecord` (picklable, so it crosses
multiprocessing workers) and the consumer counts it or raises, per `on_bad_record`.
"""

from __future__ import annotations

import dataclasses
import types
import warnings
from typing import Any

import grain
import numpy as np

from glmv_jax.batch import get_rope_index, patch_layout, rope_delta
from glmv_jax.data import chat_template, placeholders
from glmv_jax.data.image_files import MAX_IMAGE_PIXELS, load_image
from glmv_jax.data.image_processing import ImageProcessorConfig, process_images
from glmv_jax.data.records import BadRecord, BadRecordError, IMAGE_MARK, VIDEO_MARK, parse_record
from glmv_jax.data.video_processing import VideoProcessorConfig, process_videos

PRETRAIN_PREFIX = "[gMASK]<sop>"
TEMPLATE_OF_MODEL = {"glm4v": "glm41v", "glm4v_moe": "glm45v", "glm46v": "glm46v"}   # an HF model_type's chat template


@dataclasses.dataclass(frozen=True)
class Processor:
    """Everything besides the tokenizer that turns a record into model inputs."""
    image: ImageProcessorConfig = ImageProcessorConfig()
    video: VideoProcessorConfig = VideoProcessorConfig()
    template: str = "glm41v"                 # chat template: glm41v | glm45v | glm46v
    timestamp_style: str = "glm41v"          # video timestamp text: glm41v ("3") | glm46v ("3.0 seconds")
    enable_thinking: bool | None = None

    @classmethod
    def for_model(cls, model_config: Any, template: str = "glm41v", **pixel_budget) -> "Processor":
        """Patch / merge sizes from the model's vision config. `pixel_budget` (min_pixels, max_pixels) applies
        to images and to videos (where it covers all frames jointly); otherwise HF's defaults."""
        vision = model_config.vision
        sizes = dict(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                     merge_size=vision.spatial_merge_size)
        style = "glm46v" if template == "glm46v" else "glm41v"
        return cls(image=ImageProcessorConfig(**sizes, **pixel_budget),
                   video=VideoProcessorConfig(**sizes, **pixel_budget), template=template, timestamp_style=style)

    @property
    def merge_size(self) -> int:
        return self.image.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.image.temporal_patch_size * self.image.patch_size ** 2


# --------------------------------------------------------------------------- images


def process_vision(record: dict, processor: Processor, max_pixels: int = MAX_IMAGE_PIXELS) -> dict:
    """Load (image_files.load_image: sizes checked before decoding) + process the record's images and video
    -> HF-processor-shaped arrays (rows in processor order)."""
    out = {"pixel_values": None, "image_grid_thw": None, "pixel_values_videos": None, "video_grid_thw": None,
           "video_timestamps": None}
    where = record["where"]
    try:
        if record["images"]:
            images = [load_image(ref, where, max_pixels) for ref in record["images"]]
            out.update(process_images(images, processor.image))
        if record["video"] is not None:
            frames = [load_image(ref, where, max_pixels) for ref in record["video"]["frames"]]
            with warnings.catch_warnings():      # its fps-based timestamps are unused: the record has them
                warnings.simplefilter("ignore")
                video = process_videos(frames, config=processor.video, sample_frames=False)
            grid_t = int(video["video_grid_thw"][0, 0])
            stamps = record["video"]["timestamps"][:: processor.video.temporal_patch_size][:grid_t]
            stamps += stamps[-1:] * (grid_t - len(stamps))          # the padded last pair repeats its time
            out.update(pixel_values_videos=video["pixel_values_videos"], video_grid_thw=video["video_grid_thw"],
                       video_timestamps=[stamps])
    except ValueError as e:      # aspect ratio > 200, frames of different sizes, ...
        if isinstance(e, BadRecordError):
            raise
        raise BadRecordError("unreadable_image", where, f"image processing failed: {e}") from None
    return out


def patches_in_token_order(token_type: np.ndarray, vision: dict, merge: int, patch_dim: int) -> dict[str, np.ndarray]:
    """Patch rows reordered as the vision token runs appear: each run of type 1 takes the next image, each
    run of type 2 the next video frame. -> pixel_values [N, Pd], patch_pos, patch_grid [N, 2], patch_frame [N]."""
    items = {1: [], 2: []}     # (rows, (1, h, w)) per image / per video temporal patch
    for kind, rows_key, grid_key in ((1, "pixel_values", "image_grid_thw"), (2, "pixel_values_videos", "video_grid_thw")):
        start = 0
        for t, h, w in (vision[grid_key] if vision[grid_key] is not None else []):
            for _ in range(int(t)):       # images have t = 1; a video contributes one item per temporal patch
                items[kind].append((vision[rows_key][start:start + h * w], (1, int(h), int(w))))
                start += int(h * w)
    order, prev = [], 0
    for kind in token_type.tolist():
        if kind != 0 and kind != prev:
            order.append(items[kind].pop(0))
        prev = kind
    layout = patch_layout([grid for _, grid in order], merge)
    rows = [rows for rows, _ in order] or [np.zeros((0, patch_dim), np.float32)]
    return {"pixel_values": np.concatenate(rows).astype(np.float32), "patch_pos": layout["patch_pos"],
            "patch_grid": layout["patch_grid"], "patch_frame": (layout["patch_segment"] - 1).astype(np.int32)}


# --------------------------------------------------------------------------- tokens


def render_pretraining_text(text: str, tokenizer) -> tuple[list[int], list[int]]:
    """`[gMASK]<sop>` + text (markers -> placeholders) + `<|endoftext|>`; label mask 1 on every token after
    the prefix (pretraining trains on all text; vision tokens are masked later)."""
    rendered = text.replace(IMAGE_MARK, chat_template.IMAGE_PLACEHOLDER)
    rendered = rendered.replace(VIDEO_MARK, chat_template.VIDEO_PLACEHOLDER)
    prefix = tokenizer.encode(PRETRAIN_PREFIX)
    body = tokenizer.encode(rendered) + [tokenizer.eos_id]
    return prefix + body, [0] * len(prefix) + [1] * len(body)


def expand_vision_tokens(ids, label, tokenizer, vision: dict, processor: Processor) -> tuple[list[int], list[int]]:
    """Each `<|image|>` id -> t*h*w/m^2 copies; each `<|video|>` id -> the tokenized per-frame placeholder text
    (placeholders.video_placeholder). Expanded tokens are never labels."""
    m = processor.merge_size
    images = list(vision["image_grid_thw"]) if vision["image_grid_thw"] is not None else []
    videos = [] if vision["video_grid_thw"] is None else list(zip(vision["video_grid_thw"], vision["video_timestamps"]))
    out_ids, out_label = [], []
    for token, lab in zip(ids, label):
        if token == tokenizer.image_id:
            piece = [tokenizer.image_id] * int(np.prod(images.pop(0)) // m ** 2)
        elif token == tokenizer.video_id:
            grid, stamps = videos.pop(0)
            piece = tokenizer.encode(placeholders.video_placeholder(grid, stamps, processor.timestamp_style, m))
        else:
            out_ids.append(token)
            out_label.append(lab)
            continue
        out_ids.extend(piece)
        out_label.extend([0] * len(piece))
    if images or videos:
        raise ValueError(f"{len(images)} image(s) / {len(videos)} video(s) left without a placeholder token")
    return out_ids, out_label


def _positions(ids: np.ndarray, token_type: np.ndarray, vision: dict, merge: int) -> np.ndarray:
    config = types.SimpleNamespace(vision=types.SimpleNamespace(spatial_merge_size=merge))
    pos, _ = get_rope_index(config, ids[None], token_type[None], vision["image_grid_thw"], vision["video_grid_thw"])
    return pos[:, 0].astype(np.int32)


def _token_types(ids: np.ndarray, tokenizer) -> np.ndarray:
    return placeholders.mm_token_type_ids(ids, tokenizer.image_id, tokenizer.token_to_id("<|begin_of_video|>"),
                                          tokenizer.token_to_id("<|end_of_video|>"))


def _bad(e: Exception, record: dict | None, element: dict) -> BadRecord:
    where = record["where"] if record else element.get("where", "?")
    if isinstance(e, BadRecordError):
        return BadRecord(e.reason, e.where, e.message)
    return BadRecord("invalid_record", where, str(e))


# --------------------------------------------------------------------------- grain transforms


class _RecordTransform(grain.transforms.Map):
    """raw element -> parse_record -> `refuse(record)` (a reason string, or None) -> `build(record)`; any
    record error becomes a BadRecord naming the record. Image paths must resolve inside `data_root` (default:
    the manifest's folder); images of more than `max_image_pixels` pixels are refused before decoding."""
    data_root: str | None = None
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def map(self, element: dict) -> dict | BadRecord:
        record = None
        try:
            record = parse_record(element, self.data_root)
            reason = self.refuse(record)
            if reason:
                raise BadRecordError("invalid_field", record["where"], reason)
            return self.build(record)
        except (BadRecordError, chat_template.ChatTemplateError) as e:
            return _bad(e, record, element)


class TrainingExampleTransform(_RecordTransform):
    """raw element -> sample dict (packing.py format) or BadRecord.

    loss_on: "auto" (conversations: assistant turns; pretraining text: all text) or "all" (every text token
    after the `[gMASK]<sop>` prefix, e.g. conversations used as pretraining data)."""

    def __init__(self, tokenizer, processor: Processor, loss_on: str = "auto", *, data_root: str | None = None,
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        if loss_on not in ("auto", "all"):
            raise ValueError(f"loss_on must be 'auto' or 'all', got {loss_on!r}")
        self.tokenizer, self.processor, self.loss_on = tokenizer, processor, loss_on
        self.data_root, self.max_image_pixels = data_root, max_image_pixels

    def refuse(self, record: dict) -> str | None:
        return "an rl prompt has no target to train on" if record["kind"] == "rl" else None

    def build(self, record: dict) -> dict:
        return self.example(record)

    def example(self, record: dict) -> dict:
        tok, proc = self.tokenizer, self.processor
        vision = process_vision(record, proc, self.max_image_pixels)
        if record["messages"] is not None:
            ids, label = chat_template.build_training_example(
                {"id": record["id"], "messages": record["messages"], "images": record["images"]}, tok,
                proc.template, enable_thinking=proc.enable_thinking)
            ids, label = ids.tolist(), label.tolist()
            if self.loss_on == "all":
                n_prefix = len(tok.encode(PRETRAIN_PREFIX))
                label = [0] * n_prefix + [1] * (len(ids) - n_prefix)
        else:
            ids, label = render_pretraining_text(record["text"], tok)
        ids, label = expand_vision_tokens(ids, label, tok, vision, proc)
        ids = np.asarray(ids, np.int32)
        token_type = _token_types(ids, tok)
        is_text = token_type == 0
        label = np.asarray(label, bool) & is_text
        targets = np.append(ids[1:], 0).astype(np.int32)
        # train position i on target i+1 when that target is a label and both tokens are text
        loss_mask = (np.append(label[1:], False) & is_text).astype(np.float32)
        sample = {"id": record["id"], "where": record["where"], "input_ids": ids, "targets": targets,
                  "loss_mask": loss_mask, "token_type": token_type,
                  "position_ids": _positions(ids, token_type, vision, proc.merge_size),
                  "image_grid_thw": vision["image_grid_thw"], "video_grid_thw": vision["video_grid_thw"]}
        sample.update(patches_in_token_order(token_type, vision, proc.merge_size, proc.patch_dim))
        return sample


class PromptTransform(_RecordTransform):
    """raw element -> RL / eval prompt dict or BadRecord: input_ids [L], token_type [L], position_ids [3, L],
    rope_delta, patches in token order (as in samples) plus the HF-shaped pixel arrays and grids, and the
    record's id / domain / answer / difficulty / messages."""

    def __init__(self, tokenizer, processor: Processor, *, data_root: str | None = None,
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.tokenizer, self.processor = tokenizer, processor
        self.data_root, self.max_image_pixels = data_root, max_image_pixels

    def refuse(self, record: dict) -> str | None:
        return "a prompt needs a conversation record" if record["messages"] is None else None

    def build(self, record: dict) -> dict:
        return self.prompt(record)

    def prompt(self, record: dict) -> dict:
        tok, proc = self.tokenizer, self.processor
        vision = process_vision(record, proc, self.max_image_pixels)
        ids = chat_template.build_prompt({"id": record["id"], "messages": record["messages"], "images": record["images"]},
                                         tok, proc.template, enable_thinking=proc.enable_thinking).tolist()
        ids, _ = expand_vision_tokens(ids, [0] * len(ids), tok, vision, proc)
        ids = np.asarray(ids, np.int32)
        token_type = _token_types(ids, tok)
        positions = _positions(ids, token_type, vision, proc.merge_size)
        out = {key: record[key] for key in ("id", "where", "kind", "domain", "answer", "difficulty", "messages", "meta")}
        out.update(input_ids=ids, token_type=token_type, position_ids=positions,
                   rope_delta=rope_delta(dict(input_ids=ids, position_ids=positions)),
                   **{k: vision[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")})
        out.update(patches_in_token_order(token_type, vision, proc.merge_size, proc.patch_dim))
        return out
