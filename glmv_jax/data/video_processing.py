"""GLM-4.1V / 4.5V / 4.6V video preprocessing: HF's `Glm4vVideoProcessor` and `Glm46VVideoProcessor`.

Pipeline per video: sample frame indices from the metadata (4.1V/4.5V: fixed fps, 4.6V: dynamic fps),
dedupe and pad an odd count -> convert to RGB -> one `smart_resize` for all frames jointly (the budget counts
every frame) -> PIL bicubic per frame -> rescale + normalize -> patchify with grid_t = ceil(T / 2).
Each temporal patch gets the timestamp (seconds) of its first frame, frame_index / fps.

HF's video processor resizes with torchvision only (torch's uint8 antialiased bicubic kernel); that backend
is not installable here, so frames are resized with PIL bicubic exactly like the image path. Measured against
that torch kernel: within 1-2 intensity levels on <1% of values, except when the height shrinks while the
width grows (e.g. 61x83 -> 56x84: up to 8 levels on smooth frames, 28% of noise values off by 1).
Everything else (sampling, budget, fused normalize, patchify, timestamps) matches HF exactly.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Sequence

import numpy as np
import PIL.Image

from glmv_jax.data.image_processing import (PatchingConfig, patchify, resize_bicubic, smart_resize,
                                            to_rgb_array)

DEFAULT_FPS_WHEN_UNKNOWN = 24  # HF's Glm4vProcessor fallback for timestamps


@dataclasses.dataclass
class VideoMetadata:
    """What frame sampling and timestamps need. `total_num_frames` defaults to the number of frames given."""
    fps: float | None = None
    total_num_frames: int | None = None
    duration: float | None = None


# --------------------------------------------------------------------------- frame sampling


def _dedupe_and_pad_even(indices: Sequence[int]) -> np.ndarray:
    """Drop repeated indices (first occurrence wins) and repeat the last one if the count is odd."""
    unique = list(dict.fromkeys(int(i) for i in indices))
    if len(unique) % 2:
        unique.append(unique[-1])
    return np.asarray(unique, dtype=np.int64)


def _duration(meta: VideoMetadata) -> float:
    return meta.duration or round((meta.total_num_frames - 1) / meta.fps) + 1


def sample_frames_glm41v(meta: VideoMetadata, fps: float = 2, max_duration: float = 300) -> np.ndarray:
    """GLM-4.1V / 4.5V: `fps` frames per second up to `max_duration`, else max_duration*fps evenly spaced times."""
    last = meta.total_num_frames - 1
    duration = _duration(meta)
    if duration <= max_duration:
        count = max(int(math.floor(duration * fps)), 1)
        indices = [min(last, int(math.ceil(i * meta.fps / fps))) for i in range(count)]
    else:
        count = int(max_duration * fps)
        if count >= meta.total_num_frames:
            indices = list(range(meta.total_num_frames))
        else:
            seconds = np.linspace(0, duration, count, endpoint=True)
            indices = [min(last, int(math.ceil(s * meta.fps))) for s in seconds]
    return _dedupe_and_pad_even(indices)


def _glm46v_target_fps(effective_duration: float) -> float:
    if effective_duration <= 30:
        return 3
    return 1 if effective_duration <= 300 else 0.5


def sample_frames_glm46v(meta: VideoMetadata, temporal_patch_size: int = 2, max_duration: float = 2400,
                         max_frames: int = 640) -> np.ndarray:
    """GLM-4.6V dynamic fps: 3 fps up to 30 s, 1 fps up to 300 s, else 0.5 fps; at most `max_frames` frames."""
    total = meta.total_num_frames
    duration = _duration(meta)
    effective = min(duration, max_duration)
    target_fps = _glm46v_target_fps(effective)
    wanted = min(int(effective * target_fps * temporal_patch_size), max_frames)
    if total < wanted:
        indices = np.linspace(0, total - 1, wanted, dtype=int).tolist()
    else:  # take a frame each time its timestamp crosses the next step of 1 / (tp * target_fps) seconds
        seconds_per_frame = 1 / meta.fps
        step = 1 / (temporal_patch_size * target_fps)
        last_second = int(duration)
        indices, next_time = [], 0
        for index in range(total):
            if index * seconds_per_frame >= next_time:
                next_time += step
                indices.append(index)
                if next_time >= last_second:
                    break
    if len(indices) < wanted:
        first, last = (indices[0], indices[-1]) if indices else (0, max(total - 1, 0))
        indices = np.linspace(first, last, wanted, dtype=int).tolist()
    elif len(indices) > wanted:
        indices = np.linspace(0, total - 1, wanted, dtype=int).tolist()
    return _dedupe_and_pad_even(indices)


# --------------------------------------------------------------------------- the processor


@dataclasses.dataclass(frozen=True, kw_only=True)
class VideoProcessorConfig(PatchingConfig):
    """HF video processor settings. `sampling` is "glm41v" (4.1V and 4.5V) or "glm46v" (4.6V dynamic fps)."""
    sampling: str = "glm41v"
    fps: float = 2
    max_duration: float = 300
    min_pixels: int = 112 * 112
    max_pixels: int = 28 * 28 * 2 * 30000

    def __post_init__(self):
        if self.sampling not in ("glm41v", "glm46v"):
            raise ValueError(f"unknown video sampling {self.sampling!r}; expected 'glm41v' or 'glm46v'")

    @classmethod
    def glm46v(cls, **overrides) -> "VideoProcessorConfig":
        return cls(**{"sampling": "glm46v", **overrides})

    def sample_frames(self, meta: VideoMetadata) -> np.ndarray:
        """Frame indices (even count) to keep from a video described by `meta`."""
        if meta.fps is None or meta.total_num_frames is None:
            raise ValueError("frame sampling needs video metadata with fps and total_num_frames "
                             f"(got {meta}); pass metadata or sample_frames=False")
        if meta.total_num_frames < 1:
            raise ValueError(f"video has no frames (total_num_frames={meta.total_num_frames})")
        if self.sampling == "glm46v":
            return sample_frames_glm46v(meta, self.temporal_patch_size)
        return sample_frames_glm41v(meta, self.fps, self.max_duration)


def _frames_array(video: Any) -> np.ndarray:
    """A list of PIL images / uint8 arrays, or a uint8 (T, H, W[, C]) array -> uint8 (T, H, W, 3)."""
    if isinstance(video, np.ndarray) and video.ndim == 4 and video.shape[-1] == 3 and video.dtype == np.uint8:
        return video
    if isinstance(video, np.ndarray) and video.ndim in (3, 4):
        video = list(video)
    if not isinstance(video, (list, tuple)) or not video:
        raise ValueError(f"a video must be a non-empty list of frames or a (T, H, W, 3) uint8 array, got {video!r:.80}")
    frames = [to_rgb_array(frame) for frame in video]
    if len({frame.shape for frame in frames}) != 1:
        raise ValueError(f"all frames of a video must have one size, got {sorted({f.shape for f in frames})}")
    return np.stack(frames)


def _as_metadata(meta: Any, num_frames: int) -> VideoMetadata:
    if meta is None:
        meta = VideoMetadata()
    elif isinstance(meta, dict):
        meta = VideoMetadata(**{k: meta.get(k) for k in ("fps", "total_num_frames", "duration")})
    if meta.total_num_frames is None:
        meta = dataclasses.replace(meta, total_num_frames=num_frames)
    if meta.total_num_frames != num_frames:
        raise ValueError(f"metadata total_num_frames={meta.total_num_frames} but the video has {num_frames} frames")
    return meta


def _is_single_video(videos: Any) -> bool:
    if isinstance(videos, np.ndarray):
        return True
    return isinstance(videos, (list, tuple)) and bool(videos) and isinstance(videos[0], (PIL.Image.Image, np.ndarray)) \
        and not (isinstance(videos[0], np.ndarray) and videos[0].ndim == 4)


def process_videos(videos: Any, metadata: Any = None, config: VideoProcessorConfig = VideoProcessorConfig(),
                   sample_frames: bool = True) -> dict[str, Any]:
    """Videos -> pixel_values_videos, video_grid_thw and per-temporal-patch timestamps.

    videos: one video (list of frames, or uint8 (T, H, W, 3)) or a list of videos.
    metadata: one VideoMetadata / dict (fps, total_num_frames, duration) per video, or None.
    sample_frames: pick frames from the metadata (needs fps); False keeps every frame given.
    Returns {"pixel_values_videos": float32 (sum_i t*h*w, 3*tp*p*p), "video_grid_thw": int64 (n, 3),
             "video_timestamps": list of float lists (grid_t seconds each), "frame_indices": list of int arrays}.
    """
    video_list = [videos] if _is_single_video(videos) else list(videos)
    if not video_list:
        raise ValueError("process_videos: no videos given")
    if metadata is None or isinstance(metadata, (VideoMetadata, dict)):
        metadata = [metadata] * len(video_list) if metadata is None or len(video_list) == 1 else metadata
    if not isinstance(metadata, (list, tuple)) or len(metadata) != len(video_list):
        raise ValueError(f"got {len(video_list)} videos but metadata for "
                         f"{len(metadata) if isinstance(metadata, (list, tuple)) else 1}; pass one entry per video")
    rows, grids, timestamps, kept_indices = [], [], [], []
    for video, meta in zip(video_list, metadata):
        frames = _frames_array(video)
        meta = _as_metadata(meta, len(frames))
        indices = config.sample_frames(meta) if sample_frames else np.arange(len(frames))
        frames = frames[indices]
        height, width = smart_resize(len(frames), frames.shape[1], frames.shape[2], factor=config.patch_size *
                                     config.merge_size, temporal_factor=config.temporal_patch_size,
                                     min_pixels=config.min_pixels, max_pixels=config.max_pixels)
        resized = np.stack([resize_bicubic(frame, height, width) for frame in frames])
        video_rows, grid = patchify(_fused_normalize(resized, config), config.patch_size, config.merge_size,
                                    config.temporal_patch_size)
        rows.append(video_rows)
        grids.append(grid)
        timestamps.append(_patch_timestamps(indices, meta.fps, grid[0]))
        kept_indices.append(indices)
    return {"pixel_values_videos": np.concatenate(rows, axis=0), "video_grid_thw": np.asarray(grids, np.int64),
            "video_timestamps": timestamps, "frame_indices": kept_indices}


def _fused_normalize(pixels: np.ndarray, config: VideoProcessorConfig) -> np.ndarray:
    """uint8 -> float32 (x - mean/r) / (std/r): HF's video path fuses the rescale into mean/std (float32)."""
    inverse = np.float32(1.0 / config.rescale_factor)
    mean = np.asarray(config.image_mean, np.float32) * inverse
    std = np.asarray(config.image_std, np.float32) * inverse
    return (pixels.astype(np.float32) - mean) / std


def _patch_timestamps(indices: np.ndarray, fps: float | None, grid_t: int) -> list[float]:
    """Time (s) of the first frame of each temporal patch: indices[::2] / fps (HF: fps 24 when unknown)."""
    if fps is None:
        warnings.warn(f"video fps unknown: timestamps assume {DEFAULT_FPS_WHEN_UNKNOWN} fps, as HF does")
        fps = DEFAULT_FPS_WHEN_UNKNOWN
    # HF hard-codes the step 2 (`timestamps[::2]`), then truncates/pads to grid_t
    stamps = [int(i) / fps for i in indices][::2][:grid_t]
    while len(stamps) < grid_t:
        stamps.append(stamps[-1] if stamps else 0)
    return stamps
