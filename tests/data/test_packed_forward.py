"""The model's forward over a packed batch equals its forward over each sample alone (segment masks,
per-segment positions and the packed patch rows keep samples apart)."""

import grain
import jax
import numpy as np
import pytest

from glmv_jax.data.packing import PackIterDataset
from glmv_jax.data.tokenizer import suite_tokenizer
from glmv_jax.data.transforms import Processor, TrainingExampleTransform
from glmv_jax.models.glmv import apply, init_params
from tests.helpers import config_for, mixed_records

B, T, NP = 2, 96, 256


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    tok = suite_tokenizer(512, cache_dir=tmp_path_factory.mktemp("tok"), records_per_domain=20)
    config = config_for(tok)
    proc = Processor.for_model(config, min_pixels=1024, max_pixels=4608)
    transform = TrainingExampleTransform(tok, proc)
    samples = [transform.map({"raw": r, "where": f"memory[{i}]", "base_dir": None})
               for i, r in enumerate(mixed_records())]
    batches = list(PackIterDataset(grain.MapDataset.source(samples).to_iter_dataset(), B, T, NP, proc.patch_dim))
    return config, init_params(config, 0), batches


def single_sample_batch(batch, row, start, end):
    """The sample at [row, start:end) alone in a [1, T] batch, with its own patch rows."""
    vision = (batch["token_type"] > 0).reshape(-1)
    flat_start = row * batch["input_ids"].shape[1] + start
    first = int(vision[:flat_start].sum()) * 4
    count = int(vision[flat_start:flat_start + end - start].sum()) * 4
    out = {}
    for key in ("input_ids", "segment_ids", "token_type"):
        x = np.zeros((1, T), batch[key].dtype)
        x[0, :end - start] = batch[key][row, start:end]
        out[key] = x
    out["segment_ids"] = (out["segment_ids"] > 0).astype(np.int32)
    pos = np.zeros((3, 1, T), batch["position_ids"].dtype)
    pos[:, 0, :end - start] = batch["position_ids"][:, row, start:end]
    out["position_ids"] = pos
    for key in ("pixel_values", "patch_pos", "patch_grid", "patch_segment"):
        x = np.zeros_like(batch[key])
        x[:count] = batch[key][first:first + count]
        if key == "patch_grid":
            x[count:] = 1
        out[key] = x
    return out


def test_packed_forward_equals_per_sample_forward(packed):
    config, params, batches = packed
    run = jax.jit(lambda p, b: apply(config, p, b))
    checked = with_vision = 0
    for batch in batches[:2]:
        model_keys = {k: batch[k] for k in ("input_ids", "segment_ids", "position_ids", "token_type", "pixel_values",
                                            "patch_pos", "patch_grid", "patch_segment")}
        logits = np.asarray(run(params, model_keys))
        for row in range(B):
            seg = batch["segment_ids"][row]
            for s in range(1, seg.max() + 1):
                idx = np.nonzero(seg == s)[0]
                start, end = int(idx[0]), int(idx[-1]) + 1
                alone = np.asarray(run(params, single_sample_batch(batch, row, start, end)))
                ref = alone[0, :end - start]
                err = np.abs(logits[row, start:end] - ref).max() / np.abs(ref).max()
                assert err < 1e-5, (row, s, err)
                checked += 1
                with_vision += int((batch["token_type"][row, start:end] > 0).any())
    assert checked >= 4 and with_vision >= 2
