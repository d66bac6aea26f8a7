"""Packing into the BATCH.md batch: every token once, positions = HF get_rope_index of the sample alone,
no target across segments, vision tokens <-> patch rows in order, oversize samples, efficiency stats."""
import collections

import grain
import numpy as np
import pytest
import torch

from glmv_jax.config import tiny
from glmv_jax.data.image_processing import process_images
from glmv_jax.data.packing import BatchBuilder, PackIterDataset, check_batch
from glmv_jax.data.records import BadRecordError
from glmv_jax.data.tokenizer import suite_tokenizer
from glmv_jax.data.transforms import Processor, TrainingExampleTransform
from glmv_jax.data.video_processing import process_videos
from tests.helpers import mixed_records
from tests.hf_oracle import build_hf_model

B, T, NP = 3, 96, 320


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = suite_tokenizer(512, cache_dir=tmp_path_factory.mktemp("tok"), records_per_domain=20)
    proc = Processor.for_model(tiny(), min_pixels=1024, max_pixels=4608)
    records = mixed_records()
    transform = TrainingExampleTransform(tok, proc)
    samples = [transform.map({"raw": r, "where": f"memory[{i}]", "base_dir": None}) for i, r in enumerate(records)]
    assert all(isinstance(s, dict) for s in samples), samples
    ds = grain.MapDataset.source(samples).to_iter_dataset()
    it = iter(PackIterDataset(ds, B, T, NP, proc.patch_dim))
    batches = list(it)
    return dict(tok=tok, proc=proc, records=records, samples=samples, batches=batches, stats=it.stats())


def segments(batch):
    """Yields (row, start, end, segment id) of each packed sample."""
    for r in range(batch["segment_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            idx = np.nonzero(seg == s)[0]
            assert (np.diff(idx) == 1).all(), "a segment must be contiguous"
            yield r, idx[0], idx[-1] + 1, s


def test_every_token_of_every_sample_exactly_once(setup):
    def key(d):
        return tuple(np.asarray(d[k]).tobytes() for k in ("input_ids", "targets", "loss_mask", "token_type",
                                                            "position_ids"))
    packed = collections.Counter()
    for batch in setup["batches"]:
        check_batch(batch)
        for r, a, b, _ in segments(batch):
            packed[key({k: batch[k][r, a:b] for k in ("input_ids", "targets", "loss_mask", "token_type")} |
                       {"position_ids": batch["position_ids"][:, r, a:b]})] += 1
    assert packed == collections.Counter(key(s) for s in setup["samples"])
    assert setup["stats"]["samples"] == len(setup["samples"]) and setup["stats"]["skipped"] == {}


def test_segments_restart_and_positions_equal_hf_get_rope_index(setup):
    hf = build_hf_model(tiny()).model
    by_ids = {s["input_ids"].tobytes(): s for s in setup["samples"]}
    seen = 0
    for batch in setup["batches"]:
        for r, a, b, s in segments(batch):
            sample = by_ids[batch["input_ids"][r, a:b].tobytes()]
            grids = {k: None if sample[k] is None else torch.from_numpy(np.asarray(sample[k], np.int64))
                     for k in ("image_grid_thw", "video_grid_thw")}
            expected, _ = hf.get_rope_index(torch.from_numpy(sample["input_ids"][None].astype(np.int64)),
                                            torch.from_numpy(sample["token_type"][None]), **grids)
            np.testing.assert_array_equal(batch["position_ids"][:, r, a:b], expected[:, 0].numpy())
            assert batch["position_ids"][:, r, a].tolist() == [0, 0, 0]      # restarts in every segment
            seen += 1
        pad = batch["segment_ids"] == 0
        assert (batch["position_ids"][:, pad] == 0).all() and (batch["input_ids"][pad] == 0).all()
    assert seen == len(setup["samples"])


def test_no_target_crosses_a_segment(setup):
    for batch in setup["batches"]:
        for r, a, b, _ in segments(batch):
            ids, tg, lm = batch["input_ids"][r], batch["targets"][r], batch["loss_mask"][r]
            np.testing.assert_array_equal(tg[a:b - 1], ids[a + 1:b])        # next token inside the segment
            assert tg[b - 1] == 0 and lm[b - 1] == 0                        # nothing across the boundary
        assert (batch["loss_mask"][batch["segment_ids"] == 0] == 0).all()
        assert (batch["loss_mask"][batch["token_type"] != 0] == 0).all()
        # a trained target is never a vision token either
        tt_next = np.concatenate([batch["token_type"][:, 1:], np.zeros_like(batch["token_type"][:, :1])], 1)
        assert (batch["loss_mask"][tt_next != 0] == 0).all()
    trained = sum(int(b["loss_mask"].sum()) for b in setup["batches"])
    assert trained > 0


def test_loss_mask_is_the_assistant_answer(setup):
    """An SFT sample trains exactly on its assistant turn (+ the end-of-turn token); pretraining text on all of
    its text tokens (a target after a vision token, i.e. <|end_of_image|>, is not trained)."""
    tok = setup["tok"]
    for rec, s in zip(setup["records"], setup["samples"]):
        trained = tok.decode(s["targets"][s["loss_mask"] > 0])
        if "messages" in rec:
            expected = rec["messages"][-1]["content"] + "<|user|>"
        elif rec["id"] == "vid":
            expected = "<|begin_of_video|><|end_of_video|>A short clip.<|endoftext|>"
        else:   # pretraining text: every text target, image tokens and what follows them excluded
            expected = rec["text"].replace("<image>", "<|begin_of_image|>") + "<|endoftext|>"
        assert trained == expected, rec["id"]


def expected_rows(record, proc):
    """The processor's own patch rows for a record, in placeholder order (images, or the video's frames)."""
    if "video" in record:
        return process_videos(record["video"]["frames"], config=proc.video, sample_frames=False)["pixel_values_videos"]
    if record.get("images"):
        return process_images(record["images"], proc.image)["pixel_values"]
    return np.zeros((0, proc.patch_dim), np.float32)


@pytest.mark.filterwarnings("ignore:video fps unknown")
def test_kth_vision_token_takes_the_kth_images_patches(setup):
    proc, m = setup["proc"], setup["proc"].merge_size
    by_ids = {s["input_ids"].tobytes(): i for i, s in enumerate(setup["samples"])}
    for batch in setup["batches"]:
        vision = batch["token_type"] != 0                                  # row-major = token-appearance order
        n_real = int((batch["patch_segment"] > 0).sum())
        assert vision.sum() * m * m == n_real
        assert (batch["patch_segment"][n_real:] == 0).all() and (batch["patch_grid"][n_real:] == 1).all()
        k = 0                                                               # vision tokens seen so far
        for r, a, b, _ in segments(batch):
            record = setup["records"][by_ids[batch["input_ids"][r, a:b].tobytes()]]
            n_tok = int(vision[r, a:b].sum())
            rows = slice(4 * k, 4 * (k + n_tok))
            np.testing.assert_array_equal(batch["pixel_values"][rows], expected_rows(record, proc))
            # each token's 3D position (h, w offsets) is the merge block of its 4 patch rows
            pos = batch["position_ids"][:, r, a:b][:, vision[r, a:b]]
            pp = batch["patch_pos"][rows].reshape(n_tok, 4, 2)
            np.testing.assert_array_equal(pos[1] - pos[0], pp[:, 0, 0] // m)
            np.testing.assert_array_equal(pos[2] - pos[0], pp[:, 0, 1] // m)
            assert (pp // m == pp[:, :1] // m).all()                       # the 4 rows form one 2x2 block
            seg = batch["patch_segment"][rows].reshape(n_tok, 4)
            assert (seg == seg[:, :1]).all()
            k += n_tok
    # patch_segment counts images/frames 1..n consecutively in each batch
    for batch in setup["batches"]:
        segs = batch["patch_segment"][batch["patch_segment"] > 0]
        assert segs[0] == 1 and set(np.diff(segs).tolist()) <= {0, 1}


def test_efficiency_stats(setup):
    st = setup["stats"]
    last = setup["batches"][-1]
    assert st["token_efficiency"] == pytest.approx((last["segment_ids"] > 0).sum() / (B * T))
    assert st["patch_efficiency"] == pytest.approx((last["patch_segment"] > 0).sum() / NP)
    total_tokens = sum(len(s["input_ids"]) for s in setup["samples"])
    assert st["tokens"] == total_tokens and st["batches"] == len(setup["batches"])
    assert st["mean_token_efficiency"] == pytest.approx(total_tokens / (len(setup["batches"]) * B * T))


def test_oversize_samples_skipped_or_raised(setup):
    samples = setup["samples"]
    longest = max(len(s["input_ids"]) for s in samples)
    most_patches = max(len(s["pixel_values"]) for s in samples)
    ds = grain.MapDataset.source(samples).to_iter_dataset()
    it = iter(PackIterDataset(ds, 2, longest - 1, most_patches - 1, setup["proc"].patch_dim))
    kept = sum(int(b["segment_ids"].max(axis=1).sum()) for b in it)
    n_long = sum(len(s["input_ids"]) > longest - 1 for s in samples)
    n_patch = sum(len(s["input_ids"]) <= longest - 1 and len(s["pixel_values"]) > most_patches - 1 for s in samples)
    assert it.stats()["skipped"] == {k: v for k, v in (("too_long", n_long), ("too_many_patches", n_patch)) if v}
    assert kept == len(samples) - n_long - n_patch
    with pytest.raises(BadRecordError, match=r"too_long.*tokens exceed the packed length"):
        list(iter(PackIterDataset(ds, 2, longest - 1, 10**6, setup["proc"].patch_dim, on_bad_record="raise")))
    # a repeating stream where nothing fits does not spin forever
    forever = grain.MapDataset.source(samples).repeat().to_iter_dataset()
    with pytest.raises(BadRecordError, match="50 bad records in a row"):
        next(iter(PackIterDataset(forever, 2, 8, NP, setup["proc"].patch_dim, max_consecutive_bad=50)))


def test_batch_builder_first_fit_and_budget():
    def sample(n_tok, n_patch):
        z = np.zeros(n_tok, np.int32)
        return dict(input_ids=z + 5, targets=z, loss_mask=z.astype(np.float32), token_type=z,
                    position_ids=np.zeros((3, n_tok), np.int32), pixel_values=np.zeros((n_patch, 6), np.float32),
                    patch_pos=np.zeros((n_patch, 2), np.int32), patch_grid=np.ones((n_patch, 2), np.int32),
                    patch_frame=np.zeros(n_patch, np.int32))
    bb = BatchBuilder(2, 10, 8, 6)
    assert bb.add(sample(6, 0)) and bb.add(sample(6, 4)) and bb.add(sample(4, 4))   # rows 0, 1, then 0 again
    assert bb.row_tokens == [10, 6] and not bb.add(sample(1, 1))                    # patch budget full
    batch, info = bb.build()
    assert batch["segment_ids"].tolist() == [[1] * 6 + [2] * 4, [1] * 6 + [0] * 4]
    # patches follow token order: row 0's second sample (4 rows) before row 1's sample
    assert batch["patch_segment"].tolist() == [1] * 4 + [2] * 4 and info == {"samples": 3, "tokens": 16, "patches": 8}
