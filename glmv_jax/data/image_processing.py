"""GLM-4.1V / 4.5V / 4.6V image preprocessing, identical to HF's `Glm4vImageProcessorPil`.

Pipeline per image: convert to RGB (transparency composited onto white) -> `smart_resize` target ->
PIL bicubic resize -> rescale 1/255 -> CLIP mean/std normalize -> patchify with the frame duplicated
to `temporal_patch_size` copies. HF picks its PIL backend whenever torchvision is missing (as here);
its torchvision backend resizes differently (up to a few intensity levels), so this module matches the
PIL backend bit for bit and the torchvision one only approximately.

Row layout of `pixel_values` (docs/models.md section 3): one row per 14x14 patch, rows in merge-block order
(grid_t, block_row, block_col, in_row, in_col), values ordered (channel, t, py, px).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
import PIL.Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


# --------------------------------------------------------------------------- target size


def smart_resize(num_frames: int, height: int, width: int, factor: int = 28, temporal_factor: int = 2,
                 min_pixels: int = 112 * 112, max_pixels: int = 14 * 14 * 2 * 2 * 2 * 6144) -> tuple[int, int]:
    """Resized (height, width), multiples of `factor`, as HF's glm4v `smart_resize`.

    The pixel budget counts `num_frames` frames (an image counts its duplicated temporal frame, a video all
    of its frames), with `num_frames` rounded (banker's rounding) to a multiple of `temporal_factor`.
    Images smaller than `factor` are first scaled up (with int truncation) so the short side is `factor`.
    """
    if num_frames < temporal_factor:
        raise ValueError(f"smart_resize: num_frames={num_frames} must be at least temporal_factor={temporal_factor}")
    if height <= 0 or width <= 0:
        raise ValueError(f"smart_resize: image size must be positive, got height={height}, width={width}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_ASPECT_RATIO:
        raise ValueError(f"smart_resize: aspect ratio {aspect} of a {height}x{width} image exceeds {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# --------------------------------------------------------------------------- pixel steps


def to_rgb_array(image: Any) -> np.ndarray:
    """A PIL image (any mode) or a uint8 array (H, W), (H, W, 1|3|4) -> uint8 (H, W, 3).

    Transparency (an alpha band, or a palette/`transparency` entry) is composited onto white, as HF does.
    """
    if isinstance(image, PIL.Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.array(PIL.Image.alpha_composite(white, rgba).convert("RGB"))
        return np.array(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a PIL image or a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (H, W[, C]) with values 0..255, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array must be (H, W) or (H, W, C) with C in 1, 3, 4; got shape {image.shape}")
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 4:  # HF's array path: alpha blend onto white, rounded
        alpha = image[..., 3:4] / 255
        return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return image


def resize_bicubic(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (height, width, 3) with PIL's (antialiasing) bicubic filter."""
    resized = PIL.Image.fromarray(rgb).resize((width, height), resample=PIL.Image.Resampling.BICUBIC)
    return np.asarray(resized)


def rescale_and_normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float],
                          rescale_factor: float = 1 / 255) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 ((x * rescale_factor) - mean) / std, HF's PIL-backend arithmetic.

    The rescale runs in float64 and is cast to float32; mean/std are float32 (so results match bit for bit).
    """
    scaled = (pixels.astype(np.float64) * rescale_factor).astype(np.float32)
    return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def patchify(frames: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int
             ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(T, H, W, C) float frames -> (grid_t * grid_h * grid_w, C * tp * p * p) rows and (grid_t, grid_h, grid_w).

    T is padded to a multiple of `temporal_patch_size` by repeating the last frame (an image, T=1, gets
    its frame duplicated). Rows run (grid_t, block_row, block_col, in_row, in_col); values (c, t, py, px).
    """
    num_frames, height, width, channels = frames.shape
    block = patch_size * merge_size
    if height % block or width % block:
        raise ValueError(f"patchify: frame size {height}x{width} is not a multiple of patch_size*merge_size={block}")
    if pad := -num_frames % temporal_patch_size:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    grid_t = frames.shape[0] // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    x = frames.reshape(grid_t, temporal_patch_size, grid_h // merge_size, merge_size, patch_size,
                       grid_w // merge_size, merge_size, patch_size, channels)
    # axes: 0 gt, 1 t, 2 bh, 3 mh, 4 py, 5 bw, 6 mw, 7 px, 8 c  ->  (gt, bh, bw, mh, mw, c, t, py, px)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    rows = x.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return np.ascontiguousarray(rows), (grid_t, grid_h, grid_w)


# --------------------------------------------------------------------------- the processor


@dataclasses.dataclass(frozen=True, kw_only=True)
class PatchingConfig:
    """What images and videos share: patch sizes, the 2x2 merge and normalisation."""
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageProcessorConfig(PatchingConfig):
    """HF `Glm4vImageProcessor` settings. min/max_pixels are HF's size shortest_edge/longest_edge (pixel counts)."""
    min_pixels: int = 112 * 112
    max_pixels: int = 28 * 28 * 15000

    @classmethod
    def glm41v(cls, **overrides) -> "ImageProcessorConfig":
        """The GLM-4.1V-9B-Thinking shipped preprocessor_config (longest_edge 9,633,792)."""
        return cls(**{"max_pixels": 9_633_792, **overrides})

    @classmethod
    def from_vision_config(cls, vision_config: Any, **overrides) -> "ImageProcessorConfig":
        """Patch/merge sizes taken from a model's vision config (e.g. glmv_jax.config tiny presets)."""
        return cls(**{"patch_size": vision_config.patch_size,
                      "temporal_patch_size": vision_config.temporal_patch_size,
                      "merge_size": vision_config.spatial_merge_size, **overrides})

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def target_size(self, height: int, width: int, num_frames: int | None = None) -> tuple[int, int]:
        """smart_resize with this config; num_frames defaults to the duplicated image frame."""
        return smart_resize(num_frames or self.temporal_patch_size, height, width, factor=self.factor,
                            temporal_factor=self.temporal_patch_size,
                            min_pixels=self.min_pixels, max_pixels=self.max_pixels)


def _as_image_list(images: Any) -> list:
    if isinstance(images, (PIL.Image.Image, np.ndarray)):
        return [images]
    if isinstance(images, (list, tuple)) and images:
        return list(images)
    raise ValueError(f"images must be a PIL image, a uint8 array or a non-empty list of them, got {images!r:.80}")


def process_images(images: Any, config: ImageProcessorConfig = ImageProcessorConfig()) -> dict[str, np.ndarray]:
    """Images -> {"pixel_values": float32 (sum_i h_i*w_i, 3*tp*p*p), "image_grid_thw": int64 (n, 3)}.

    `images` is one PIL image / uint8 (H, W, C) array, or a list of them; rows are concatenated in order.
    """
    rows, grids = [], []
    for image in _as_image_list(images):
        rgb = to_rgb_array(image)
        height, width = config.target_size(*rgb.shape[:2])
        pixels = rescale_and_normalize(resize_bicubic(rgb, height, width), config.image_mean, config.image_std,
                                       config.rescale_factor)
        image_rows, grid = patchify(pixels[None], config.patch_size, config.merge_size, config.temporal_patch_size)
        rows.append(image_rows)
        grids.append(grid)
    return {"pixel_values": np.concatenate(rows, axis=0), "image_grid_thw": np.asarray(grids, dtype=np.int64)}


def num_image_tokens(image_grid_thw: np.ndarray, merge_size: int = 2) -> np.ndarray:
    """Placeholder tokens per image: t*h*w / merge_size**2 -> int64 (n,)."""
    return np.prod(np.asarray(image_grid_thw, np.int64), axis=-1) // merge_size ** 2
