"""parallel.global_batch on one process: vision_index, the per-host index offsets, the joined batch the hosts
make (the model computes each host's rows as on that host alone, and as the same rows packed compactly),
merge_vision_tokens with vision_index == without on single-host batches, the single-process put ==
device_put with the train step's shardings, bad batches, and data.batch_size read as the global batch.

Host batches come from the two-process test's worker: host 0 has two images (48 of 64 patch rows), host 1
one image in its second row (16 of 64) and more text, both with patch_frames.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmv_jax.config import tiny
from glmv_jax.data.pipeline import data_config, per_process
from glmv_jax.models.glmv import apply, init_params, merge_vision_tokens
from glmv_jax.sharding.global_batch import (add_vision_index, block_axes, global_batch, join_host_batches,
                                            offset_indices)
from glmv_jax.sharding.mesh import make_mesh
from glmv_jax.sharding.rules import DEFAULT
from glmv_jax.sharding.global_batch import batch_shardings
from tests.sharding.multiprocess_worker import FRAMES, PATCHES, ROWS, host_batch, reference_batch

CONFIG = tiny()


@pytest.fixture(scope="module")
def hosts():
    return [host_batch(CONFIG, h) for h in range(2)]


@pytest.fixture(scope="module")
def model():
    params = init_params(CONFIG, 0)
    run = jax.jit(functools.partial(apply, CONFIG))
    return lambda batch: np.asarray(run(params, batch))


def stacked(batches):
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


def test_vision_index_counts_vision_tokens_row_major(hosts):
    index = add_vision_index(hosts[0])["vision_index"]
    vision = hosts[0]["token_type"] > 0
    assert (index[~vision] == -1).all()
    np.testing.assert_array_equal(index[0][vision[0]], np.arange(4))            # a 4x4 image: 4 tokens
    np.testing.assert_array_equal(index[2][vision[2]], np.arange(4, 12))        # then a 4x8 image: 8 tokens
    assert (add_vision_index(hosts[1])["vision_index"][1][hosts[1]["token_type"][1] > 0] == np.arange(4)).all()
    # presplit micro-batches each count their own tokens
    np.testing.assert_array_equal(add_vision_index(stacked(hosts))["vision_index"],
                                  np.stack([add_vision_index(b)["vision_index"] for b in hosts]))


def test_offsets_make_host_indices_global(hosts):
    local, out = hosts[1], offset_indices(hosts[1], 1)
    seg = local["patch_segment"]
    np.testing.assert_array_equal(out["patch_segment"], np.where(seg > 0, seg + PATCHES, 0))
    frames = local["patch_frames"]
    np.testing.assert_array_equal(out["patch_frames"], np.where(frames >= 0, frames + PATCHES, -1))
    vision = local["token_type"] > 0
    index = add_vision_index(local)["vision_index"]
    np.testing.assert_array_equal(out["vision_index"], np.where(vision, index + PATCHES // 4, -1))
    for key in ("input_ids", "pixel_values", "position_ids"):
        np.testing.assert_array_equal(out[key], local[key])
    first = offset_indices(local, 0)                  # host block 0 keeps its indices
    for key in ("patch_segment", "patch_frames"):
        np.testing.assert_array_equal(first[key], local[key])
    np.testing.assert_array_equal(first["vision_index"], index)


def test_joined_batch_layout(hosts):
    joined = join_host_batches(hosts)
    assert joined["input_ids"].shape == (2 * ROWS, hosts[0]["input_ids"].shape[1])
    assert joined["position_ids"].shape[1] == 2 * ROWS
    assert joined["pixel_values"].shape[0] == 2 * PATCHES and joined["patch_frames"].shape[0] == 2 * FRAMES
    seg = joined["patch_segment"]
    ids0, ids1 = set(seg[:PATCHES][seg[:PATCHES] > 0]), set(seg[PATCHES:][seg[PATCHES:] > 0])
    assert ids0 and ids1 and not ids0 & ids1                                     # frame ids never collide
    slots = joined["patch_frames"][joined["patch_frames"] >= 0]
    np.testing.assert_array_equal(np.sort(slots), np.flatnonzero(seg > 0))     # every real row in one slot
    # host 1's vision tokens take the features of its own block (rows 64.. -> merged features 16..)
    vision = joined["token_type"] > 0
    assert sorted(joined["vision_index"][vision]) == list(range(12)) + list(range(16, 20))
    assert block_axes(hosts[0])["position_ids"] == 1 and block_axes(stacked(hosts))["position_ids"] == 2


def test_joined_batch_computes_each_hosts_rows(hosts, model):
    joined = join_host_batches(hosts)
    logits = model(joined)
    for h, local in enumerate(hosts):
        np.testing.assert_allclose(logits[h * ROWS:(h + 1) * ROWS], model(local), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, model(add_vision_index(reference_batch(CONFIG))), rtol=1e-5, atol=1e-5)
    # the global row-major cumsum (no vision_index) gives host 1's image the padding rows after host 0's
    vision = joined["token_type"] > 0
    stale = model({k: v for k, v in joined.items() if k != "vision_index"})
    assert not np.allclose(stale[ROWS:][vision[ROWS:]], logits[ROWS:][vision[ROWS:]], atol=1e-3)


def test_merge_with_vision_index_equals_without_on_one_host(hosts, model):
    for local in hosts:
        np.testing.assert_array_equal(model(add_vision_index(local)), model(local))
    rng = np.random.default_rng(0)
    x, features = jnp.asarray(rng.standard_normal((2, 5, 3))), jnp.asarray(rng.standard_normal((4, 3)))
    token_type = jnp.asarray([[0, 1, 1, 0, 0], [1, 0, 0, 1, 0]])
    index = jnp.asarray([[-1, 3, 0, -1, -1], [2, -1, -1, 1, -1]])
    merged = np.asarray(merge_vision_tokens(x, features, token_type, index))
    expected = np.asarray(x).copy()
    for b, t in zip(*np.nonzero(np.asarray(token_type))):
        expected[b, t] = features[index[b, t]]
    np.testing.assert_array_equal(merged, expected)
    by_order = np.asarray(merge_vision_tokens(x, features, token_type))
    np.testing.assert_array_equal(by_order[np.asarray(token_type) > 0], np.asarray(features))


@pytest.mark.parametrize("presplit", [False, True])
def test_single_process_put_equals_device_put(hosts, presplit):
    mesh = make_mesh({"data": 2, "fsdp": 4})
    local = stacked(hosts) if presplit else reference_batch(CONFIG)
    out = global_batch(local, mesh, DEFAULT)
    expected = add_vision_index(local)
    assert sorted(out) == sorted(expected)
    per_micro = {k: v[0] for k, v in expected.items()} if presplit else expected
    for key, sharding in batch_shardings(per_micro, mesh, DEFAULT).items():
        spec = (None, *sharding.spec) if presplit else tuple(sharding.spec)
        assert out[key].sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)),
                                                  expected[key].ndim), key
        np.testing.assert_array_equal(np.asarray(out[key]), expected[key], err_msg=key)
    rows = ("data",) if presplit else (("data", "fsdp"),)     # 4 rows per micro-batch split 2 ways, 8 rows 8 ways
    assert tuple(out["input_ids"].sharding.spec)[int(presplit):][:1] == rows


def test_bad_batches_raise(hosts):
    good = hosts[0]
    cases = [
        ({k: v for k, v in good.items() if k != "token_type"}, "token_type"),
        ({**good, "pixel_values": good["pixel_values"][:-2], "patch_pos": good["patch_pos"][:-2],
          "patch_grid": good["patch_grid"][:-2], "patch_segment": good["patch_segment"][:-2]}, "merge_area"),
        ({**good, "patch_segment": np.where(np.arange(PATCHES) == 0, 0, good["patch_segment"])}, "vision tokens"),
        ({k: v for k, v in good.items() if k != "patch_grid"}, "patch_grid"),
        ({**good, "patch_pos": good["patch_pos"][:-4]}, "disagree"),
        ({k: v for k, v in good.items() if k not in ("pixel_values", "patch_pos", "patch_grid", "patch_segment")},
         "no patch rows"),
    ]
    for batch, match in cases:
        with pytest.raises(ValueError, match=match):
            offset_indices(batch, 1)
    with pytest.raises(ValueError, match="not per-row"):
        block_axes({**good, "sample_weight": np.ones(ROWS + 1, np.float32)})
    split = stacked(hosts)
    with pytest.raises(ValueError, match="leading axis"):
        block_axes({**split, "patch_frames": split["patch_frames"][:1]})
    with pytest.raises(ValueError, match="no sharding"):
        global_batch(good, make_mesh({"fsdp": 8}), shardings={})


def test_batch_size_is_global_and_split_over_processes():
    cfg = data_config(dict(batch_size=8, patch_budget=512, micro_batches=2))
    host = per_process(cfg, 2)
    assert (host.batch_size, host.patch_budget, host.micro_batches) == (4, 256, 2)
    assert per_process(cfg, 1) == cfg
    with pytest.raises(ValueError, match="batch_size 6 .* 4 processes"):
        per_process(data_config(dict(batch_size=6, patch_budget=512)), 4)
    with pytest.raises(ValueError, match="patch_budget 100 .* 8 processes"):
        per_process(data_config(dict(batch_size=8, patch_budget=100)), 8)
    with pytest.raises(ValueError, match="micro_batches"):        # 4 rows per host do not split into 8
        per_process(data_config(dict(batch_size=8, patch_budget=512, micro_batches=8)), 2)
