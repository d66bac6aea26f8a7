"""Image/video preprocessing against HF transformers (the oracle).

Images: HF's `Glm4vImageProcessor` falls back to `Glm4vImageProcessorPil` without torchvision; we compare
with that class directly. Videos: HF's `Glm4vVideoProcessor` / `Glm46VVideoProcessor` need torchvision,
which cannot be installed next to torch 2.13 here. We load their real source files and run the real
pipeline (frame sampling, metadata, joint resize target, grouping, fused normalize, patchify) with a
stand-in for the three torchvision functions it calls: `resize` (PIL bicubic per frame, the resize this
port uses; real torchvision would use torch's uint8 antialiased bicubic), `normalize` (sub then div, as
torchvision) and `grayscale_to_rgb`.
"""
import enum
import importlib.util
import math
import os
import sys
import types

import numpy as np
import PIL.Image
import pytest
import torch

import transformers.image_processing_backends as hf_backends
import transformers.models.glm4v as hf_glm4v_pkg
import transformers.models.glm46v as hf_glm46v_pkg
import transformers.video_processing_utils as hf_video_utils
from transformers import Glm4vImageProcessorPil
from transformers.image_utils import PILImageResampling
from transformers.models.glm4v.image_processing_pil_glm4v import smart_resize as hf_smart_resize
from transformers.video_utils import VideoMetadata as HFVideoMetadata

from glmv_jax.data import image_processing as ip
from glmv_jax.data import video_processing as vp

RNG = np.random.default_rng(1234)


def _noise_image(height, width, channels=3):
    """Noise plus a gradient: exercises resize overshoot/clipping and smooth interpolation alike."""
    noise = RNG.integers(0, 256, (height, width, channels))
    ramp = (np.arange(width)[None, :, None] * 255 // max(width - 1, 1)) + np.zeros((height, 1, channels), int)
    return ((noise + ramp) // 2).astype(np.uint8)


# --------------------------------------------------------------------------- HF video oracle


def _load_hf_source(package, module_file, stub_torchvision):
    """Execute an HF model source file as a fresh module (the lazy module would refuse without torchvision)."""
    path = os.path.join(os.path.dirname(package.__file__), module_file + ".py")
    name = f"{package.__name__}._oracle_{module_file}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    stub_names = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2",
                  "torchvision.transforms.v2.functional"] if stub_torchvision else []
    saved = {n: sys.modules.get(n) for n in stub_names}
    for n in stub_names:  # only to satisfy an unconditional import line; nothing from it is used
        sys.modules[n] = types.ModuleType(n)
    if stub_torchvision:
        sys.modules["torchvision.transforms.v2"].functional = sys.modules["torchvision.transforms.v2.functional"]
    try:
        spec.loader.exec_module(module)
    finally:
        for n, old in saved.items():
            if old is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = old
    return module


class _InterpolationMode(enum.Enum):
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


def _tv_resize(image, size, interpolation, antialias=True):
    assert interpolation == _InterpolationMode.BICUBIC and image.dtype == torch.uint8 and antialias
    height, width = size
    frames = image.reshape(-1, *image.shape[-3:]).permute(0, 2, 3, 1).numpy()
    out = np.stack([np.asarray(PIL.Image.fromarray(f).resize((width, height), PIL.Image.Resampling.BICUBIC))
                    for f in frames])
    return torch.from_numpy(out).permute(0, 3, 1, 2).reshape(*image.shape[:-2], height, width).contiguous()


def _tv_normalize(image, mean, std, inplace=False):
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return image.sub(mean).div(std)


def _tv_grayscale_to_rgb(video):
    return video if video.shape[-3] == 3 else video.expand(*video.shape[:-3], 3, *video.shape[-2:])


_FAKE_TVF = types.SimpleNamespace(InterpolationMode=_InterpolationMode, resize=_tv_resize,
                                  normalize=_tv_normalize, grayscale_to_rgb=_tv_grayscale_to_rgb)


@pytest.fixture(scope="module")
def hf_video():
    """(Glm4vVideoProcessor class, Glm46VVideoProcessor class) from HF's source, with the torchvision stand-in."""
    mp = pytest.MonkeyPatch()
    mp.setattr(hf_backends, "tvF", _FAKE_TVF, raising=False)
    mp.setattr(hf_video_utils, "tvF", _FAKE_TVF, raising=False)
    mp.setattr(hf_backends, "pil_torch_interpolation_mapping",
               {PILImageResampling.BICUBIC: _InterpolationMode.BICUBIC})
    v4 = _load_hf_source(hf_glm4v_pkg, "video_processing_glm4v", stub_torchvision=False)
    v46 = _load_hf_source(hf_glm46v_pkg, "video_processing_glm46v", stub_torchvision=True)
    yield v4.Glm4vVideoProcessor, v46.Glm46VVideoProcessor
    mp.undo()


# --------------------------------------------------------------------------- smart_resize


def test_smart_resize_matches_hf_on_a_sweep():
    sizes = [(224, 224), (480, 640), (1080, 1920), (50, 50), (3000, 4000), (333, 517), (10, 300), (27, 5000),
             (28, 28), (14, 15), (42, 70), (70, 42), (1, 150), (97, 13)]
    sizes += [tuple(int(v) for v in RNG.integers(1, 2500, 2)) for _ in range(200)]
    budgets = [(112 * 112, 28 * 28 * 15000), (112 * 112, 9_633_792), (112 * 112, 28 * 28 * 2 * 30000),
               (3136, 28 * 28 * 2 * 40)]
    checked = 0
    for h, w in sizes:
        for num_frames in (2, 3, 4, 17, 64):
            for lo, hi in budgets:
                try:
                    want = hf_smart_resize(num_frames, h, w, factor=28, temporal_factor=2, min_pixels=lo,
                                           max_pixels=hi)
                except ValueError:
                    with pytest.raises(ValueError, match="aspect ratio"):
                        ip.smart_resize(num_frames, h, w, 28, 2, lo, hi)
                    continue
                assert ip.smart_resize(num_frames, h, w, 28, 2, lo, hi) == want, (num_frames, h, w, lo, hi)
                checked += 1
    assert checked > 3000


def test_smart_resize_documented_examples_and_errors():
    cfg = ip.ImageProcessorConfig()
    assert cfg.target_size(224, 224) == (224, 224)
    assert cfg.target_size(480, 640) == (476, 644)
    assert cfg.target_size(1080, 1920) == (1092, 1932)
    assert cfg.target_size(50, 50) == (84, 84)
    assert cfg.target_size(3000, 4000) == (2100, 2800)
    assert ip.ImageProcessorConfig.glm41v().target_size(3000, 4000) == (1876, 2520)
    assert cfg.target_size(10, 300) == (28, 840)  # upscaled first: 10x300 -> 28x840
    with pytest.raises(ValueError, match="aspect ratio"):
        cfg.target_size(10, 3000)
    with pytest.raises(ValueError, match="temporal_factor"):
        ip.smart_resize(1, 100, 100)
    with pytest.raises(ValueError, match="positive"):
        ip.smart_resize(2, 0, 100)


# --------------------------------------------------------------------------- images


def _assert_same_as_hf(ours, theirs):
    assert ours["image_grid_thw"].dtype == np.int64
    np.testing.assert_array_equal(ours["image_grid_thw"], np.asarray(theirs["image_grid_thw"]))
    want = np.asarray(theirs["pixel_values"])
    assert ours["pixel_values"].dtype == np.float32 and ours["pixel_values"].shape == want.shape
    np.testing.assert_allclose(ours["pixel_values"], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("height,width", [(50, 50), (480, 640), (333, 517), (10, 300), (224, 224), (29, 1000),
                                          (1000, 29), (131, 97)])
def test_single_image_matches_hf_pil_processor(height, width):
    image = PIL.Image.fromarray(_noise_image(height, width))
    _assert_same_as_hf(ip.process_images(image), Glm4vImageProcessorPil()(image, return_tensors="np"))


def _mode_images():
    rgba = _noise_image(61, 83, 4)
    rgba[..., 3] = RNG.integers(0, 256, rgba.shape[:2])
    palette = PIL.Image.fromarray(_noise_image(77, 45)).convert("P", palette=PIL.Image.Palette.ADAPTIVE)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 3
    return {
        "RGBA": PIL.Image.fromarray(rgba, "RGBA"),
        "L": PIL.Image.fromarray(_noise_image(64, 90, 1)[..., 0], "L"),
        "LA": PIL.Image.fromarray(rgba[..., 2:], "LA"),
        "P": palette,
        "P+transparency": palette_transparent,
        "1": PIL.Image.fromarray(_noise_image(40, 40, 1)[..., 0] > 128),
        "CMYK": PIL.Image.fromarray(rgba, "RGBA").convert("CMYK"),
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_image_modes_match_hf(mode):
    image = _mode_images()[mode]
    _assert_same_as_hf(ip.process_images([image]), Glm4vImageProcessorPil()([image], return_tensors="np"))


def test_numpy_inputs_match_hf():
    rgba = _noise_image(57, 71, 4)
    gray = _noise_image(40, 60, 1)
    arrays = [_noise_image(57, 71), rgba, gray]
    _assert_same_as_hf(ip.process_images(arrays), Glm4vImageProcessorPil()(arrays, return_tensors="np"))
    # HF refuses 2-D arrays; we read them as (H, W, 1)
    np.testing.assert_array_equal(ip.process_images(gray[..., 0])["pixel_values"],
                                  ip.process_images(gray)["pixel_values"])


def test_several_images_and_configs_match_hf():
    images = [PIL.Image.fromarray(_noise_image(h, w)) for h, w in [(50, 50), (480, 640), (333, 517), (10, 300)]]
    _assert_same_as_hf(ip.process_images(images), Glm4vImageProcessorPil()(images, return_tensors="np"))
    # the downscale branch with a small budget, and the shipped 4.1V budget on a large image
    small = ip.ImageProcessorConfig(min_pixels=3136, max_pixels=28 * 28 * 2 * 20)
    hf_small = Glm4vImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 28 * 28 * 2 * 20})
    _assert_same_as_hf(ip.process_images(images, small), hf_small(images, return_tensors="np"))
    hf_41v = Glm4vImageProcessorPil(size={"shortest_edge": 12544, "longest_edge": 9_633_792})
    _assert_same_as_hf(ip.process_images(images, ip.ImageProcessorConfig.glm41v()), hf_41v(images, return_tensors="np"))


def test_tiny_patch_config_matches_hf():
    class TinyVision:  # shaped like glmv_jax.config's vision config
        patch_size, temporal_patch_size, spatial_merge_size = 4, 2, 2
    cfg = ip.ImageProcessorConfig.from_vision_config(TinyVision, min_pixels=64, max_pixels=2 * 32 * 32)
    hf = Glm4vImageProcessorPil(patch_size=4, merge_size=2, size={"shortest_edge": 64, "longest_edge": 2 * 32 * 32})
    images = [PIL.Image.fromarray(_noise_image(h, w)) for h, w in [(20, 30), (64, 64), (7, 50)]]
    ours = ip.process_images(images, cfg)
    _assert_same_as_hf(ours, hf(images, return_tensors="np"))
    assert ours["pixel_values"].shape[1] == 3 * 2 * 4 * 4


def test_patch_layout_is_merge_block_order_with_duplicated_frame():
    """Independent of HF: each row holds one 14x14 patch; 4 consecutive rows form a 2x2 block, raster blocks."""
    frame = RNG.standard_normal((1, 56, 84, 3)).astype(np.float32)
    rows, grid = ip.patchify(frame, patch_size=14, merge_size=2, temporal_patch_size=2)
    assert grid == (1, 4, 6) and rows.shape == (24, 3 * 2 * 14 * 14)
    row = 0
    for block_row in range(2):
        for block_col in range(3):
            for in_row in range(2):
                for in_col in range(2):
                    y, x = (2 * block_row + in_row) * 14, (2 * block_col + in_col) * 14
                    patch = frame[0, y:y + 14, x:x + 14].transpose(2, 0, 1)  # (c, py, px)
                    want = np.stack([patch, patch], axis=1).reshape(-1)  # (c, t, py, px), t duplicated
                    np.testing.assert_array_equal(rows[row], want)
                    row += 1


def test_bad_image_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="aspect ratio"):
        ip.process_images(PIL.Image.new("RGB", (3000, 10)))
    with pytest.raises(TypeError, match="uint8"):
        ip.process_images(np.zeros((30, 30, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        ip.process_images(np.zeros((30, 30, 2), np.uint8))
    with pytest.raises(ValueError, match="non-empty list"):
        ip.process_images([])
    with pytest.raises(TypeError, match="PIL image"):
        ip.process_images(["not an image"])


# --------------------------------------------------------------------------- video frame sampling


def _sampling_cases():
    cases = []
    for fps in (1, 2.5, 7, 10, 23.976, 24, 25, 29.97, 30, 60):
        for seconds in (0.3, 1, 2.2, 3, 9.9, 30, 31, 120, 299.5, 300, 301, 700, 2400, 3000):
            total = max(1, int(round(seconds * fps)))
            cases.append((total, fps, seconds))
            cases.append((total, fps, None))  # duration derived from frame count
    return cases


def test_glm41v_sampling_matches_hf(hf_video):
    hf_cls, _ = hf_video
    for fps_wanted in (2, 1, 0.5):
        hf_self = types.SimpleNamespace(fps=2, max_duration=300)
        for total, fps, seconds in _sampling_cases():
            want = hf_cls.sample_frames(hf_self, HFVideoMetadata(total_num_frames=total, fps=fps, duration=seconds),
                                        fps=fps_wanted)
            meta = vp.VideoMetadata(fps=fps, total_num_frames=total, duration=seconds)
            got = vp.VideoProcessorConfig(fps=fps_wanted).sample_frames(meta)
            np.testing.assert_array_equal(got, want, err_msg=str((total, fps, seconds, fps_wanted)))
            assert len(got) % 2 == 0


def test_glm46v_sampling_matches_hf(hf_video):
    _, hf_cls = hf_video
    hf_self = types.SimpleNamespace(temporal_patch_size=2)
    for total, fps, seconds in _sampling_cases() + [(5, 30, 10.0), (3, 1, 40.0), (1, 30, None)]:
        want = hf_cls.sample_frames(hf_self, HFVideoMetadata(total_num_frames=total, fps=fps, duration=seconds))
        got = vp.VideoProcessorConfig.glm46v().sample_frames(
            vp.VideoMetadata(fps=fps, total_num_frames=total, duration=seconds))
        np.testing.assert_array_equal(got, want, err_msg=str((total, fps, seconds)))
    # the budget: 3 fps * 2 under 30 s, at most 640 frames for long videos
    assert len(vp.sample_frames_glm46v(vp.VideoMetadata(fps=30, total_num_frames=300, duration=10))) == 60
    assert len(vp.sample_frames_glm46v(vp.VideoMetadata(fps=30, total_num_frames=30 * 2000, duration=2000))) == 640


def test_sampling_needs_fps():
    with pytest.raises(ValueError, match="fps"):
        vp.process_videos(np.zeros((4, 28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="unknown video sampling"):
        vp.VideoProcessorConfig(sampling="qwen")


# --------------------------------------------------------------------------- whole video pipeline


def _hf_video_run(hf_cls, videos, metadata, **kwargs):
    out = hf_cls(**kwargs.pop("init", {}))(videos=videos, video_metadata=metadata, return_metadata=True,
                                          return_tensors="np", **kwargs)
    return out


def _assert_video_same(ours, theirs):
    np.testing.assert_array_equal(ours["video_grid_thw"], np.asarray(theirs["video_grid_thw"]))
    want = np.asarray(theirs["pixel_values_videos"])
    assert ours["pixel_values_videos"].dtype == np.float32 and ours["pixel_values_videos"].shape == want.shape
    np.testing.assert_allclose(ours["pixel_values_videos"], want, rtol=0, atol=1e-6)
    for stamps, frames, grid, meta in zip(ours["video_timestamps"], ours["frame_indices"],
                                          ours["video_grid_thw"], theirs["video_metadata"]):
        np.testing.assert_array_equal(frames, meta.frames_indices)
        assert stamps == list(meta.timestamps[::2][: grid[0]])


@pytest.mark.parametrize("sampling", ["glm41v", "glm46v"])
def test_videos_match_hf(hf_video, sampling):
    hf_cls = hf_video[0] if sampling == "glm41v" else hf_video[1]
    specs = [(12, 60, 80, 4.0, 3.0), (45, 33, 50, 15.0, None), (100, 50, 75, 25.0, 4.0), (7, 10, 300, 7.0, 1.0)]
    videos = [_noise_image(t * h, w).reshape(t, h, w, 3) for t, h, w, _, _ in specs]
    metas = [dict(fps=fps, total_num_frames=t, duration=d) for t, _, _, fps, d in specs]
    ours = vp.process_videos(videos, metas, vp.VideoProcessorConfig(sampling=sampling))
    theirs = _hf_video_run(hf_cls, videos, [HFVideoMetadata(**m) for m in metas])
    _assert_video_same(ours, theirs)
    assert all(t % 2 == 0 for t in (len(f) for f in ours["frame_indices"]))


def test_joint_pixel_budget_and_single_video_forms_match_hf(hf_video):
    hf_cls, _ = hf_video
    budget = {"shortest_edge": 3136, "longest_edge": 28 * 28 * 2 * 24}
    cfg = vp.VideoProcessorConfig(min_pixels=3136, max_pixels=28 * 28 * 2 * 24)
    video = _noise_image(40 * 90, 120).reshape(40, 90, 120, 3)
    meta = dict(fps=10.0, total_num_frames=40, duration=4.0)
    ours = vp.process_videos(video, vp.VideoMetadata(**meta), cfg)  # one video, not a list
    theirs = _hf_video_run(hf_cls, [video], [HFVideoMetadata(**meta)], size=budget)
    _assert_video_same(ours, theirs)
    t, h, w = ours["video_grid_thw"][0]
    assert t * 2 * h * w * 14 * 14 <= cfg.max_pixels  # the budget covers all 8 sampled frames together


def test_unsampled_frames_odd_count_and_pil_frames_match_hf(hf_video):
    hf_cls, _ = hf_video
    frames = [PIL.Image.fromarray(_noise_image(45, 64)) for _ in range(5)]  # odd count, no metadata
    with pytest.warns(UserWarning, match="fps unknown"):
        ours = vp.process_videos(frames, None, sample_frames=False)
    theirs = _hf_video_run(hf_cls, frames, None, do_sample_frames=False)
    np.testing.assert_array_equal(ours["video_grid_thw"], np.asarray(theirs["video_grid_thw"]))
    np.testing.assert_allclose(ours["pixel_values_videos"], np.asarray(theirs["pixel_values_videos"]),
                               rtol=0, atol=1e-6)
    assert ours["video_grid_thw"][0, 0] == 3  # 5 frames padded to 6
    assert ours["video_timestamps"][0] == [0 / 24, 2 / 24, 4 / 24]  # HF assumes 24 fps without metadata
    # HF cannot take non-RGB PIL frames (it stacks np.array(frame)); we convert them as images are converted
    gray = [frame.convert("L") for frame in frames]
    with pytest.warns(UserWarning):
        ours_gray = vp.process_videos(gray, None, sample_frames=False)
        want_gray = vp.process_videos([[f.convert("RGB") for f in gray]], None, sample_frames=False)
    np.testing.assert_array_equal(ours_gray["pixel_values_videos"], want_gray["pixel_values_videos"])


def test_bad_video_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="one size"):
        vp.process_videos([[np.zeros((28, 28, 3), np.uint8), np.zeros((30, 28, 3), np.uint8)]], None,
                          sample_frames=False)
    with pytest.raises(ValueError, match="total_num_frames"):
        vp.process_videos(np.zeros((4, 28, 28, 3), np.uint8), vp.VideoMetadata(fps=2, total_num_frames=9))
    with pytest.raises(ValueError, match="one entry per video"):
        vp.process_videos([np.zeros((4, 28, 28, 3), np.uint8)] * 2, [vp.VideoMetadata(fps=2)] * 3)
    with pytest.raises(ValueError, match="temporal_factor"):  # a single frame cannot fill a temporal patch
        vp.process_videos(np.zeros((1, 28, 28, 3), np.uint8), None, sample_frames=False)
    with pytest.warns(UserWarning, match="fps unknown"):  # two 28x28 frames: min_pixels scales them to 84x84
        out = vp.process_videos(np.zeros((2, 28, 28, 3), np.uint8), None, sample_frames=False)
    assert out["video_grid_thw"].tolist() == [[1, 6, 6]] and math.isfinite(out["pixel_values_videos"].sum())
