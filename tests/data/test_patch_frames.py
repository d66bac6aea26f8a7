"""patch_frames in training batches: the packer's [F, L] ViT layout (exactly frame_slots of the batch, fixed
shape, frame capacity and bad frames handled), the same loss and gradients as without it, micro-batches
that index their own patch rows (the accumulated step equals the one without patch_frames), and the config
defaults (the longest frame of the image size, F from the patch budget)."""
import dataclasses

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from glmv_jax.batch import frame_slots
from glmv_jax.data.packing import BatchBuilder, PackIterDataset, default_frames, sample_fits
from glmv_jax.data.pipeline import data_config, frame_shape, make_pipeline
from glmv_jax.data.records import BadRecordError
from glmv_jax.data.transforms import TrainingExampleTransform
from glmv_jax.models.glmv import apply, init_params
from glmv_jax.train.losses import cross_entropy
from glmv_jax.train.optimizer import build_optimizer
from glmv_jax.train.state import train_state_from_params
from glmv_jax.train.step import make_train_step, presplit, split_microbatches
from tests.helpers import config_for, mixed_records

B, T, NP, L = 2, 96, 256, 64


@pytest.fixture(scope="module")
def samples(tok, proc):
    transform = TrainingExampleTransform(tok, proc)
    return [transform.map({"raw": r, "where": f"memory[{i}]", "base_dir": None}) for i, r in enumerate(mixed_records())]


def pack(samples, proc, **kw):
    it = iter(PackIterDataset(grain.MapDataset.source(samples).to_iter_dataset(), B, T, NP, proc.patch_dim, **kw))
    return list(it), it.stats()


def without_frames(batch):
    return {k: v for k, v in batch.items() if k != "patch_frames"}


def fake_sample(n_tokens, frames):
    """A sample with the given frame lengths (patch rows per image/frame)."""
    n = sum(frames)
    z = np.zeros(n_tokens, np.int32)
    return dict(input_ids=z + 5, targets=z, loss_mask=z.astype(np.float32), token_type=z,
                position_ids=np.zeros((3, n_tokens), np.int32), pixel_values=np.zeros((n, 6), np.float32),
                patch_pos=np.zeros((n, 2), np.int32), patch_grid=np.ones((n, 2), np.int32),
                patch_frame=np.repeat(np.arange(len(frames)), frames).astype(np.int32))


# ---------------------------------------------------------------------------------------------- the layout

def test_packed_patch_frames_are_frame_slots_of_the_batch(samples, proc):
    batches, stats = pack(samples, proc, frame_len=L)
    frames = default_frames(NP, L)
    assert stats["samples"] == len(samples) and stats["skipped"] == {} and len(batches) >= 3
    for batch in batches:
        pf, seg = batch["patch_frames"], batch["patch_segment"]
        assert pf.shape == (frames, L) and pf.dtype == np.int32                  # fixed for every batch
        np.testing.assert_array_equal(pf, frame_slots(seg, frames=frames, frame_len=L))
        # independently: every real patch row in exactly one slot, each frame a run of consecutive rows
        used = pf[pf >= 0]
        np.testing.assert_array_equal(np.sort(used), np.flatnonzero(seg > 0))
        for row in pf:
            real = row[row >= 0]
            assert (row[len(real):] == -1).all()                                 # empty slots at the end
            for s in np.unique(seg[real]):
                run = real[seg[real] == s]
                np.testing.assert_array_equal(run, np.flatnonzero(seg == s))
    # the same stream as without patch_frames, only the key added
    plain, _ = pack(samples, proc)
    assert len(plain) == len(batches)
    for a, b in zip(plain, batches):
        assert set(b) - set(a) == {"patch_frames"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_constructed_batch_layout_by_hand():
    bb = BatchBuilder(2, 10, 24, 6, frame_len=8, frames=3)
    assert bb.add(fake_sample(4, [4])) and bb.add(fake_sample(4, [8, 4]))     # rows 0..3 | 4..11, 12..15
    batch, _ = bb.build()
    # longest first: the 8-row frame takes row 0 alone, the two 4-row frames share row 1, row 2 is empty
    expected = np.full((3, 8), -1)
    expected[0] = np.arange(4, 12)
    expected[1] = list(range(0, 4)) + list(range(12, 16))
    np.testing.assert_array_equal(batch["patch_frames"], expected)


def test_frame_rows_close_the_batch_and_bad_frames_are_counted(samples, proc):
    bb = BatchBuilder(4, 100, 100, 6, frame_len=8, frames=2)
    assert bb.add(fake_sample(3, [8])) and bb.add(fake_sample(3, [4, 2]))       # rows: [8] [4, 2]
    assert bb.add(fake_sample(3, [2]))                                           # 3 frames, still 2 rows
    assert not bb.add(fake_sample(3, [4]))                                       # would need a 3rd row
    assert bb.n_patches == 16 and bb.build()[0]["patch_frames"].shape == (2, 8)
    with pytest.raises(ValueError, match="longer than frame_len=8"):
        BatchBuilder(2, 10, 24, 6, frame_len=8).add(fake_sample(2, [12]))
    with pytest.raises(ValueError, match="frame_len must be positive"):
        BatchBuilder(2, 10, 24, 6, frame_len=0)
    assert sample_fits(fake_sample(2, [4, 4, 4]), 10, 24, 8, 1).reason == "too_many_frames"
    # real samples: frames longer than frame_len are skipped and counted, or raise
    longest = max(int(np.bincount(s["patch_frame"]).max()) for s in samples if len(s["patch_frame"]))
    n_long = sum(len(s["patch_frame"]) > 0 and np.bincount(s["patch_frame"]).max() > longest - 4 for s in samples)
    batches, stats = pack(samples, proc, frame_len=longest - 4)
    assert stats["skipped"] == {"frame_too_long": n_long} and stats["samples"] == len(samples) - n_long
    assert all(b["patch_frames"].shape[1] == longest - 4 for b in batches)
    with pytest.raises(BadRecordError, match=f"frame_too_long.*exceeds data.frame_len={longest - 4}"):
        pack(samples, proc, frame_len=longest - 4, on_bad_record="raise")


# ---------------------------------------------------------------------------------------------- the model

@pytest.fixture(scope="module")
def model(tok):
    config = config_for(tok)
    return config, init_params(config, 0)


def loss_fn_for(config):
    def loss_fn(params, batch, rng=None):
        logits = apply(config, params, batch)
        loss_sum, count, _ = cross_entropy(logits, batch["targets"], batch["loss_mask"])
        return loss_sum, (count, {})
    return loss_fn


def max_rel_err(a, b):
    return max(float(jnp.abs(x - y).max() / jnp.maximum(jnp.abs(y).max(), 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_loss_and_gradients_equal_without_patch_frames(samples, proc, model):
    config, params = model
    batches, _ = pack(samples, proc, frame_len=L)
    grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn_for(config)(p, b)[0]))
    for batch in batches[:2]:
        assert (batch["patch_segment"] > 0).sum() > 100 and (batch["patch_frames"] >= 0).any(axis=1).sum() > 1
        loss, grads = grad(params, batch)
        ref_loss, ref_grads = grad(params, without_frames(batch))
        assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
        assert max_rel_err(grads, ref_grads) < 1e-5
        assert float(jnp.abs(grads["vision"]["patch_embed"]["kernel"]).max()) > 0
    # a layout that drops one frame's rows changes the loss: the key is really used
    pf, first_frame = batches[0]["patch_frames"], np.flatnonzero(batches[0]["patch_segment"] == 1)
    broken = dict(batches[0], patch_frames=np.where(np.isin(pf, first_frame), -1, pf))
    assert abs(float(grad(params, broken)[0]) - float(grad(params, batches[0])[0])) > 1e-4


def test_micro_batches_index_their_own_patch_rows_and_accumulate_equally(samples, tok, proc, model):
    config, params = model
    cfg = dict(seq_len=T, batch_size=2 * B, patch_budget=2 * NP, micro_batches=2, frame_len=L, shuffle=False,
               num_epochs=None, read_threads=1)
    stacked = next(make_pipeline(cfg, tok, proc, sources=mixed_records()))
    frames = default_frames(NP, L)
    assert stacked["patch_frames"].shape == (2, frames, L) and stacked["pixel_values"].shape[:2] == (2, NP)
    for j in range(2):      # micro-batch j's slots index its own NP patch rows
        np.testing.assert_array_equal(stacked["patch_frames"][j],
                                      frame_slots(stacked["patch_segment"][j], frames=frames, frame_len=L))
        assert (stacked["patch_segment"][j] > 0).sum() > 0
    optimizer = build_optimizer(dict(lr=1e-3, warmup_steps=0, total_steps=10, clip_norm=0.0))
    step = make_train_step(loss_fn_for(config), optimizer, grad_accum_steps=2, split_fn=presplit, donate=False)
    state = train_state_from_params(params, optimizer, jax.random.key(0))
    new, metrics = step(state, stacked)
    ref, ref_metrics = step(state, without_frames(stacked))
    for key in ("loss", "grad_norm", "tokens"):
        assert float(metrics[key]) == pytest.approx(float(ref_metrics[key]), rel=1e-5), key
    # Adam's first moment after one step is (1 - b1) * the accumulated gradient
    first_moment = lambda s: optax.tree_utils.tree_get(s.opt_state, "mu")
    assert max_rel_err(first_moment(new), first_moment(ref)) < 1e-5
    assert float(jnp.abs(first_moment(new)["vision"]["blocks"]["attn"]["qkv"]["kernel"]).max()) > 0


def test_split_microbatches_refuses_patch_frames_even_when_f_equals_b():
    batch = {"input_ids": np.zeros((4, 8), np.int32), "patch_frames": np.zeros((4, 16), np.int32)}
    with pytest.raises(ValueError, match="patch_frames.*not per-row.*presplit"):
        split_microbatches(batch, 2)


# ---------------------------------------------------------------------------------------------- the config

def test_frame_shape_from_the_data_config(tok, proc):
    demo_proc = dataclasses.replace(proc, image=dataclasses.replace(proc.image, patch_size=8, min_pixels=2 * 64 * 64,
                                                                    max_pixels=2 * 64 * 64))
    cfg = data_config(dict(source="synthetic", image_size=64, patch_budget=2560))
    assert frame_shape(cfg, demo_proc) == (40, 64)                  # 64x64 images of 8x8 patches: 40 frames of 64
    assert frame_shape(dataclasses.replace(cfg, micro_batches=4), demo_proc) == (10, 64)
    assert frame_shape(dataclasses.replace(cfg, frame_len=32, frames=7), demo_proc) == (7, 32)
    assert frame_shape(dataclasses.replace(cfg, frame_len=0), demo_proc) == (None, None)
    # other sources: the longest frame max_pixels allows (4608 / (2 * 4 * 4) = 144), F from the budget
    assert frame_shape(data_config(dict(source="jsonl", patch_budget=512)), proc) == (default_frames(512, 144), 144)
    assert frame_shape(data_config(dict(source="jsonl", patch_budget=64)), proc) == (1, 64)
    for bad in (dict(frame_len=-1), dict(frames=0)):
        with pytest.raises(ValueError, match="data.frame_len must be >= 0"):
            data_config(bad)
    synth = dict(source="synthetic", domains=["counting"], num_records=2, image_size=28, seq_len=T, batch_size=B,
                 patch_budget=NP, num_epochs=1)
    assert next(make_pipeline(synth, tok, proc))["patch_frames"].shape == (default_frames(NP, 64, 64), 64)
    assert "patch_frames" not in next(make_pipeline(dict(synth, frame_len=0), tok, proc))
