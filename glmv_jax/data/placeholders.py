"""Placeholder expansion and mm_token_type_ids, as HF's `Glm4vProcessor` (4.1V/4.5V) and `Glm46VProcessor` (4.6V).

A rendered chat prompt holds one `<|image|>` per image and one `<|video|>` per video (docs/data.md section 2):
* each `<|image|>` becomes `<|image|>` x (t*h*w / merge**2);
* each `<|video|>` becomes, per temporal patch f: `<|begin_of_image|>` + `<|image|>` x (h*w / merge**2) +
  `<|end_of_image|>` + timestamp text, where 4.1V/4.5V write `str(int(t))` and 4.6V writes `f"{t:.1f} seconds"`.
Video frames reuse the `<|image|>` token; `mm_token_type_ids` tells them apart (2 inside a video span).
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

IMAGE_TOKEN = "<|image|>"
VIDEO_TOKEN = "<|video|>"
BEGIN_OF_IMAGE = "<|begin_of_image|>"
END_OF_IMAGE = "<|end_of_image|>"

TIMESTAMP_FORMATS: dict[str, Callable[[float], str]] = {
    "glm41v": lambda seconds: str(int(seconds)),          # GLM-4.1V and GLM-4.5V (Glm4vProcessor)
    "glm46v": lambda seconds: f"{seconds:.1f} seconds",   # GLM-4.6V (Glm46VProcessor)
}


def format_timestamp(seconds: float, style: str = "glm41v") -> str:
    """Timestamp text written after each video frame: "glm41v" -> "3", "glm46v" -> "3.5 seconds"."""
    if style not in TIMESTAMP_FORMATS:
        raise ValueError(f"unknown timestamp style {style!r}; expected one of {sorted(TIMESTAMP_FORMATS)}")
    return TIMESTAMP_FORMATS[style](seconds)


def image_placeholder(grid_thw: Sequence[int], merge_size: int = 2) -> str:
    """`<|image|>` repeated t*h*w / merge_size**2 times."""
    return IMAGE_TOKEN * (int(np.prod(np.asarray(grid_thw, np.int64))) // merge_size ** 2)


def video_placeholder(grid_thw: Sequence[int], timestamps: Sequence[float], style: str = "glm41v",
                      merge_size: int = 2) -> str:
    """Per temporal patch: begin_of_image + `<|image|>` x (h*w / merge**2) + end_of_image + timestamp text."""
    grid_t = int(grid_thw[0])
    if len(timestamps) != grid_t:
        raise ValueError(f"a video with grid_t={grid_t} temporal patches needs {grid_t} timestamps, "
                         f"got {len(timestamps)}")
    tokens_per_frame = int(np.prod(np.asarray(grid_thw, np.int64))) // merge_size ** 2 // grid_t
    frame = BEGIN_OF_IMAGE + IMAGE_TOKEN * tokens_per_frame + END_OF_IMAGE
    return "".join(frame + format_timestamp(seconds, style) for seconds in timestamps)


def expand_placeholders(text: str | Sequence[str], image_grid_thw: np.ndarray | None = None,
                        video_grid_thw: np.ndarray | None = None,
                        video_timestamps: Sequence[Sequence[float]] | None = None,
                        timestamp_style: str = "glm41v", merge_size: int = 2) -> str | list[str]:
    """Expand every `<|image|>` / `<|video|>` of a prompt (or a batch of prompts), consuming grids in order.

    image_grid_thw: (n_images, 3); video_grid_thw: (n_videos, 3) with video_timestamps[i] of length grid_t
    (as `process_videos` returns them). Placeholders are counted over the whole batch, like HF; a count
    that differs from the number of grids is an error.
    """
    texts = [text] if isinstance(text, str) else list(text)
    image_grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    video_grids = np.zeros((0, 3), np.int64) if video_grid_thw is None else np.asarray(video_grid_thw).reshape(-1, 3)
    timestamps = list(video_timestamps) if video_timestamps is not None else []
    if len(timestamps) != len(video_grids):
        raise ValueError(f"got {len(video_grids)} video grids but timestamps for {len(timestamps)} videos")
    for token, grids, kind in ((IMAGE_TOKEN, image_grids, "images"), (VIDEO_TOKEN, video_grids, "videos")):
        found = sum(sample.count(token) for sample in texts)
        if found != len(grids):
            raise ValueError(f"the prompt has {found} {token} placeholders but {len(grids)} {kind} were given")

    replacements = {
        IMAGE_TOKEN: iter([image_placeholder(g, merge_size) for g in image_grids]),
        VIDEO_TOKEN: iter([video_placeholder(g, ts, timestamp_style, merge_size)
                           for g, ts in zip(video_grids, timestamps)]),
    }
    pattern = re.compile(f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}")
    expanded = [pattern.sub(lambda match: next(replacements[match.group()]), sample) for sample in texts]
    return expanded[0] if isinstance(text, str) else expanded


def mm_token_type_ids(input_ids: np.ndarray, image_token_id: int, video_start_id: int,
                      video_end_id: int) -> np.ndarray:
    """int32 array shaped like input_ids ((T,) or (B, T)): 1 for image tokens, 2 for image tokens inside a
    `<|begin_of_video|>` ... `<|end_of_video|>` span, 0 elsewhere (HF's create_mm_token_type_ids)."""
    ids = np.asarray(input_ids)
    if ids.ndim not in (1, 2) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be an integer array shaped (T,) or (B, T), got {ids.dtype} {ids.shape}")
    inside_video = np.cumsum(ids == video_start_id, axis=-1) > np.cumsum(ids == video_end_id, axis=-1)
    is_image = ids == image_token_id
    return np.where(is_image, np.where(inside_video, 2, 1), 0).astype(np.int32)
