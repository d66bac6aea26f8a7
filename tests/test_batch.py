"""The batch contract helpers of glmv_jax/batch.py on small constructed inputs (integer outputs exactly):
bucketed sizes, padding, patch layout and packing, ViT frame slots, prompt checks and rope deltas."""

import numpy as np
import pytest

from glmv_jax.batch import (BATCH_WIDE_KEYS, PATCH_KEYS, batch_shapes, bucket, check_prompt, frame_lengths, frame_rows,
                            frame_slots, get_rope_index, longest_frame, pack_patches, pad_batch, patch_frames,
                            patch_layout, patch_segments, rope_delta)
from glmv_jax.config import tiny

SEG = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0], np.int32)      # frames of 3, 2, 4 rows, then 2 padding rows


# ----------------------------------------------------------------------------------------------- sizes

def test_bucket_values():
    assert [bucket(5, 16), bucket(16, 16), bucket(17, 16), bucket(100, 1), bucket(3, 1)] == [16, 16, 20, 112, 3]
    assert [bucket(100, 64, steps=16), bucket(101, 64, steps=16), bucket(0, 1)] == [100, 104, 1]


@pytest.mark.parametrize("steps", [1, 4, 16])
def test_bucket_bounds_padding_and_is_monotone_and_idempotent(steps):
    sizes = [bucket(n, 1, steps) for n in range(1, 3000)]
    for n, b in enumerate(sizes, start=1):
        assert b >= n and ((b - n) * steps < n or b == n)
        assert bucket(b, 1, steps) == b
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert len(set(sizes)) < len(sizes) // 10 or steps == 16      # few distinct sizes: few compiles


def test_pad_batch_pads_tokens_patches_and_frame_rows():
    rng = np.random.default_rng(0)
    batch = dict(input_ids=rng.integers(1, 9, (2, 3)).astype(np.int32), segment_ids=np.ones((2, 3), np.int32),
                 token_type=np.ones((2, 3), np.int32), position_ids=rng.integers(0, 5, (3, 2, 3)).astype(np.int32),
                 pixel_values=rng.standard_normal((4, 6)).astype(np.float32),
                 patch_pos=rng.integers(0, 4, (4, 2)).astype(np.int32), patch_grid=np.full((4, 2), 2, np.int32),
                 patch_segment=np.array([1, 1, 2, 2], np.int32), patch_frames=np.zeros((9, 2), np.int32))
    out = pad_batch(batch, 5, 8)
    assert out["input_ids"].shape == (2, 5) and out["position_ids"].shape == (3, 2, 5)
    for key in ("input_ids", "segment_ids", "token_type"):
        np.testing.assert_array_equal(out[key][:, :3], batch[key])
        assert (out[key][:, 3:] == 0).all()
    np.testing.assert_array_equal(out["position_ids"][..., :3], batch["position_ids"])
    assert (out["position_ids"][..., 3:] == 0).all()
    assert out["pixel_values"].shape == (8, 6) and (out["pixel_values"][4:] == 0).all()
    np.testing.assert_array_equal(out["patch_grid"], [[2, 2]] * 4 + [[1, 1]] * 4)
    np.testing.assert_array_equal(out["patch_segment"], [1, 1, 2, 2, 0, 0, 0, 0])
    assert out["patch_frames"].shape == (10, 2) and (out["patch_frames"][9:] == -1).all()   # bucket(9, 1) = 10
    assert batch["input_ids"].shape == (2, 3)                                                # input untouched
    text = {k: batch[k] for k in ("input_ids", "segment_ids", "token_type", "position_ids")}
    assert sorted(pad_batch(text, 4, 8)) == sorted(text)


def test_batch_shapes_cover_the_batch_table():
    shapes = batch_shapes(2, 5, 8, 6)
    assert set(PATCH_KEYS) <= set(shapes) and BATCH_WIDE_KEYS == PATCH_KEYS + ("patch_frames",)
    assert shapes["position_ids"] == ((3, 2, 5), np.dtype(np.int32))
    assert shapes["loss_mask"] == ((2, 5), np.dtype(np.float32))
    assert shapes["pixel_values"] == ((8, 6), np.dtype(np.float32)) and shapes["patch_segment"][0] == (8,)


# ----------------------------------------------------------------------------------------------- patch rows

def test_patch_layout_merge_block_order_and_segments():
    out = patch_layout([(1, 2, 4), (2, 2, 2)])
    blocks = [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]      # 2x2 merge blocks, row-major
    np.testing.assert_array_equal(out["patch_pos"][:8], blocks)
    np.testing.assert_array_equal(out["patch_grid"], [[2, 4]] * 8 + [[2, 2]] * 8)
    np.testing.assert_array_equal(out["patch_segment"], [1] * 8 + [2] * 4 + [3] * 4)    # one per temporal slice
    assert {k: v.shape for k, v in patch_layout([]).items()} == {"patch_pos": (0, 2), "patch_grid": (0, 2),
                                                                 "patch_segment": (0,)}


def _item(frames: list[int], patch_dim: int = 6, seed: int = 0) -> dict:
    rng, n = np.random.default_rng(seed), sum(frames)
    return dict(pixel_values=rng.standard_normal((n, patch_dim)).astype(np.float32),
                patch_pos=rng.integers(0, 4, (n, 2)).astype(np.int32),
                patch_grid=rng.integers(2, 5, (n, 2)).astype(np.int32),
                patch_frame=np.repeat(np.arange(len(frames)), frames).astype(np.int32))


def test_patch_segments_longest_frame_and_pack_patches():
    a, text, c = _item([2, 1], seed=1), {"input_ids": np.ones(3)}, _item([2], seed=2)
    np.testing.assert_array_equal(patch_segments([a, text, c]), [1, 1, 2, 3, 3])
    assert longest_frame([a, text, c]) == 2 and longest_frame([text]) == 0
    out = pack_patches([a, text, c, a], 9)
    assert list(out) == list(PATCH_KEYS) and out["pixel_values"].dtype == np.float32
    assert all(out[k].dtype == np.int32 for k in PATCH_KEYS[1:])
    np.testing.assert_array_equal(out["patch_segment"], [1, 1, 2, 3, 3, 4, 4, 5, 0])
    np.testing.assert_array_equal(out["pixel_values"][:8], np.concatenate([a["pixel_values"], c["pixel_values"],
                                                                           a["pixel_values"]]))
    np.testing.assert_array_equal(out["patch_pos"][5:8], a["patch_pos"])
    np.testing.assert_array_equal(out["patch_grid"][8], [1, 1])
    assert (out["pixel_values"][8] == 0).all() and (out["patch_pos"][8] == 0).all()
    empty = pack_patches([text], 4, patch_dim=6)
    assert empty["pixel_values"].shape == (4, 6) and (empty["patch_segment"] == 0).all()
    with pytest.raises(ValueError, match="needs patch_dim"):
        pack_patches([text], 4)
    with pytest.raises(ValueError, match="do not fit"):
        pack_patches([a], 2)


# ----------------------------------------------------------------------------------------------- frame slots

def test_frame_slots_packs_frames_longest_first():
    seg = SEG
    np.testing.assert_array_equal(frame_slots(seg), [[5, 6, 7, 8], [0, 1, 2, -1], [3, 4, -1, -1]])
    np.testing.assert_array_equal(frame_slots(seg, frame_len=6), [[5, 6, 7, 8, 3, 4], [0, 1, 2, -1, -1, -1]])
    fixed = frame_slots(seg, frames=4, frame_len=9)
    assert fixed.shape == (4, 9) and (fixed[1:] == -1).all()
    assert sorted(fixed[fixed >= 0].tolist()) == list(range(9))
    assert frame_slots(np.zeros(8, np.int32)).shape == (1, 1)


def test_frame_slots_rejects_bad_segments():
    with pytest.raises(ValueError, match="contiguous"):
        frame_slots(np.array([1, 2, 1, 0]))
    with pytest.raises(ValueError, match="contiguous"):
        frame_slots(np.array([1, 1, 3, 3]))     # frame 2 missing
    with pytest.raises(ValueError, match="does not fit"):
        frame_slots(np.array([1, 1, 1, 2]), frame_len=2)
    with pytest.raises(ValueError, match="need 2 rows"):
        frame_slots(np.array([1, 1, 1, 2, 2]), frames=1, frame_len=4)


def test_frame_lengths_and_frame_rows():
    np.testing.assert_array_equal(frame_lengths(SEG), [3, 2, 4])
    assert frame_lengths(np.zeros(3, np.int32)).size == 0
    assert [frame_rows([3, 2, 4], n) for n in (4, 6, 9)] == [3, 2, 1] and frame_rows([], 4) == 0
    with pytest.raises(ValueError, match="does not fit"):
        frame_rows([5], 4)
    rng = np.random.default_rng(0)
    for _ in range(200):                          # the rows frame_slots uses, for any frames and row length
        lengths = rng.integers(1, 30, rng.integers(1, 8))
        seg = np.repeat(np.arange(1, len(lengths) + 1), lengths)
        frame_len = int(lengths.max() + rng.integers(0, 40))
        assert frame_rows(frame_lengths(seg), frame_len) == frame_slots(seg, frame_len=frame_len).shape[0]


def test_patch_frames_buckets_both_sizes():
    assert patch_frames(SEG).shape == (1, 256)                # L = bucket(longest frame, 256): all in one row
    np.testing.assert_array_equal(patch_frames(SEG, frame_len=4), frame_slots(SEG, frame_len=4))
    assert patch_frames(SEG, frame_len=4, frames=5).shape == (5, 4)
    seg = np.repeat(np.arange(1, 6), 4)                       # 5 frames of 4 rows in rows of 4: bucket(5, 1) = 5
    assert patch_frames(seg, frame_len=4).shape == (5, 4)
    seg = np.repeat(np.arange(1, 10), 4)                      # 9 frames: bucket(9, 1) = 10 rows, the last empty
    out = patch_frames(seg, frame_len=4)
    assert out.shape == (10, 4) and (out[9] == -1).all()
    np.testing.assert_array_equal(patch_frames(np.zeros(4, np.int32)), [[-1]])


# ----------------------------------------------------------------------------------------------- prompts

def test_rope_delta_of_a_prompt_is_get_rope_index_delta():
    config = tiny()
    img = config.image_token_id
    ids = np.array([[5, 5] + [img] * 6 + [5, 5, 5]])
    types = (ids == img).astype(np.int32)
    pos, delta = get_rope_index(config, ids, types, np.array([[1, 4, 6]]))
    prompt = dict(input_ids=ids[0], token_type=types[0], position_ids=pos[:, 0])
    assert rope_delta(prompt) == int(delta[0]) == 8 - 11     # text 0-1, the image from 2 spans max(4, 6) / 2, text 5-7
    assert rope_delta({**prompt, "rope_delta": 7}) == 7
    assert rope_delta(dict(input_ids=np.arange(4), position_ids=np.tile(np.arange(4), (3, 1)))) == 0


def test_check_prompt_counts_vision_tokens_and_rejects_bad_prompts():
    ids = np.arange(6, dtype=np.int32)
    types = np.array([0, 1, 1, 0, 0, 0], np.int32)
    prompt = dict(input_ids=ids, token_type=types, position_ids=np.zeros((3, 6), np.int32),
                  pixel_values=np.zeros((8, 6), np.float32))
    assert check_prompt(0, prompt, merge_area=4) == 2
    with pytest.raises(ValueError, match="lacks"):
        check_prompt(1, {"input_ids": ids}, 4)
    with pytest.raises(ValueError, match="non-empty"):
        check_prompt(2, {**prompt, "input_ids": ids[:0]}, 4)
    with pytest.raises(ValueError, match="position_ids"):
        check_prompt(3, {**prompt, "position_ids": np.zeros((3, 5))}, 4)
    with pytest.raises(ValueError, match="need 8 patch rows, got 4"):
        check_prompt(4, {**prompt, "pixel_values": np.zeros((4, 6))}, 4)
