"""The grain pipelines: JSONL manifests with relative image paths, ArrayRecord, exact resume from a saved
state, per-host sharding, worker processes, RL prompts, configs from the experiment ConfigDict."""
import json
import os

import ml_collections
import numpy as np
import PIL.Image
import pytest

from glmv_jax.batch import get_rope_index
from glmv_jax.config import tiny
from glmv_jax.data.image_processing import process_images
from glmv_jax.data.pipeline import data_config, make_pipeline, make_prompt_pipeline, prompt_dataset
from glmv_jax.data.sources import write_array_record
from glmv_jax.data.synthetic import generate

CFG = dict(seq_len=96, batch_size=2, patch_budget=256, shuffle=False, num_epochs=1, read_threads=1)


@pytest.fixture(scope="module")
def records():
    return generate("counting", 6, seed=5, image_size=28) + generate("chart", 4, seed=6, image_size=28)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, records):
    """A JSONL manifest whose images live in img/ next to it, referenced by relative paths."""
    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    with open(root / "train.jsonl", "w") as f:
        for i, r in enumerate(records):
            r["images"][0].save(root / "img" / f"{i:03d}.png")
            f.write(json.dumps({**r, "images": [f"img/{i:03d}.png"]}) + "\n")
    return root / "train.jsonl"


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_jsonl_manifest_with_relative_image_paths(tok, proc, records, manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                   # paths resolve against the manifest, not cwd
    it = make_pipeline(CFG, tok, proc, sources=str(manifest))
    batches = list(it)
    assert it.stats()["samples"] == len(records) and it.stats()["skipped"] == {}
    # the images read back from disk are the in-memory ones, in record order (no shuffle)
    rows = np.concatenate([b["pixel_values"][b["patch_segment"] > 0] for b in batches])
    np.testing.assert_array_equal(rows, process_images([r["images"][0] for r in records], proc.image)["pixel_values"])
    # and the same stream as from the in-memory records
    assert_same(batches, list(make_pipeline(CFG, tok, proc, sources=records)))


def test_array_record_source(tok, proc, manifest, tmp_path):
    lines = [json.loads(line) for line in open(manifest)]
    lines = [{**r, "images": [os.path.join(manifest.parent, p) for p in r["images"]]} for r in lines]
    path = str(tmp_path / "train.array_record")
    write_array_record(path, lines)
    # its absolute image paths lie outside the ArrayRecord's folder: allowed by data_root
    assert_same(list(make_pipeline(CFG, tok, proc, sources=path, data_root=str(manifest.parent))),
                list(make_pipeline(CFG, tok, proc, sources=str(manifest))))


def test_resume_from_saved_state_is_exact(tok, proc, records):
    cfg = dict(CFG, shuffle=True, num_epochs=None, seed=3)           # shuffled, repeated: crosses epochs
    it = make_pipeline(cfg, tok, proc, sources=records)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))                  # JSON-able
    stats_then = it.stats()
    rest = take(it, 6)
    fresh = make_pipeline(cfg, tok, proc, sources=records)
    fresh.set_state(state)
    assert fresh.stats()["batches"] == stats_then["batches"] == 3
    assert_same(take(fresh, 6), rest)
    assert fresh.stats()["samples"] == it.stats()["samples"]
    # a different seed is a different stream
    other = take(make_pipeline(dict(cfg, seed=4), tok, proc, sources=records), 3)
    assert any((a["input_ids"] != b["input_ids"]).any() for a, b in zip(other, take(
        make_pipeline(cfg, tok, proc, sources=records), 3)))


def test_worker_processes_give_the_same_stream(tok, proc, records):
    """Worker processes (grain mp_prefetch) change nothing in the stream, and their state rewinds exactly."""
    cfg = dict(CFG, shuffle=True, num_epochs=None, seed=1)
    expected = take(make_pipeline(cfg, tok, proc, sources=records), 4)
    it = make_pipeline(dict(cfg, num_workers=2), tok, proc, sources=records)
    try:
        got = take(it, 2)
        state = json.loads(json.dumps(it.get_state()))
        got += take(it, 2)
        assert_same(got, expected)
        it.set_state(state)
        assert_same(take(it, 2), expected[2:])
    finally:
        it.close()


def test_sharding_splits_records_disjointly(tok, proc, records):
    ids = []
    for index in range(2):
        it = make_prompt_pipeline(dict(CFG, shard_index=index, shard_count=2), tok, proc, sources=records)
        ids.append([p["id"] for p in it])
    assert set(ids[0]).isdisjoint(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(r["id"] for r in records) and len(ids[0]) == len(ids[1])
    # the packed pipeline splits the same way
    counts = [make_pipeline(dict(CFG, shard_index=i, shard_count=2), tok, proc, sources=records) for i in range(2)]
    for it in counts:
        list(it)
    assert [it.stats()["samples"] for it in counts] == [len(records) // 2] * 2
    with pytest.raises(ValueError, match="shard_index 2 outside"):
        make_pipeline(dict(CFG, shard_index=2, shard_count=2), tok, proc, sources=records)


def test_prompt_pipeline_yields_prompts(tok, proc):
    rl = generate("counting", 4, seed=9, kind="rl", image_size=28)
    prompts = list(make_prompt_pipeline(CFG, tok, proc, sources=rl))
    assert [p["id"] for p in prompts] == [r["id"] for r in rl]
    for p, r in zip(prompts, rl):
        assert p["answer"] == r["answer"] and p["difficulty"] == r["difficulty"] and p["meta"]["tier"] == r["tier"]
        assert tok.decode(p["input_ids"]).endswith("<|assistant|>\n")
        assert (p["token_type"] == 1).sum() * 4 == len(p["pixel_values"]) == p["image_grid_thw"].prod()
        expected, delta = get_rope_index(tiny(), p["input_ids"][None], p["token_type"][None], p["image_grid_thw"])
        np.testing.assert_array_equal(p["position_ids"], expected[:, 0])
        assert p["rope_delta"] == delta[0]
    ds = prompt_dataset(CFG, tok, proc, sources=rl)
    assert len(ds) == 4 and ds[2]["id"] == rl[2]["id"]


def test_experiment_config_dict_and_synthetic_source(tok, proc):
    cfg = ml_collections.ConfigDict(dict(source="synthetic", manifests=[], domains=["counting", "ocr"], kind="caption",
                                         seq_len=128, batch_size=2, patch_budget=256, on_bad_record="skip",
                                         num_workers=0, image_size=28, num_records=3))
    it = make_pipeline(cfg, tok, proc, num_epochs=1)
    batches = list(it)
    assert it.stats()["samples"] == 6 and batches[0]["input_ids"].shape == (2, 128)
    assert batches[0]["pixel_values"].shape == (256, proc.patch_dim)
    with pytest.raises(ValueError, match="on_bad_record"):
        data_config(cfg, on_bad_record="ignore")
    with pytest.raises(ValueError, match="use make_prompt_pipeline"):
        make_pipeline(dict(kind="rl"), tok, proc)
    with pytest.raises(ValueError, match="needs data.manifests"):
        make_pipeline(dict(source="jsonl"), tok, proc)


def test_pipeline_images_as_uint8_pixels_not_stale(tok, proc, tmp_path):
    """Two different images under one relative name in two manifests: each manifest reads its own."""
    for d, value in (("a", 10), ("b", 200)):
        (tmp_path / d).mkdir()
        PIL.Image.new("RGB", (28, 28), (value,) * 3).save(tmp_path / d / "x.png")
        rec = {"id": d, "images": ["x.png"], "text": "<image>flat"}
        (tmp_path / d / "m.jsonl").write_text(json.dumps(rec) + "\n")
    firsts = [next(make_pipeline(CFG, tok, proc, sources=str(tmp_path / d / "m.jsonl")))["pixel_values"][0, 0]
              for d in ("a", "b")]
    assert firsts[0] < firsts[1]


def test_micro_batches_are_stacked_packed_batches(tok, proc, records):
    cfg = dict(CFG, num_epochs=None)
    stacked = take(make_pipeline(dict(cfg, micro_batches=2), tok, proc, sources=records), 2)
    single = take(make_pipeline(dict(cfg, batch_size=1, patch_budget=128), tok, proc, sources=records), 4)
    assert stacked[0]["input_ids"].shape == (2, 1, 96) and stacked[0]["position_ids"].shape == (2, 3, 1, 96)
    assert stacked[0]["pixel_values"].shape == (2, 128, proc.patch_dim)
    for i, batch in enumerate(stacked):
        for j in range(2):
            for key in batch:
                np.testing.assert_array_equal(batch[key][j], single[2 * i + j][key], err_msg=key)
    with pytest.raises(ValueError, match="divisible by micro_batches 3"):
        make_pipeline(dict(cfg, micro_batches=3), tok, proc, sources=records)
