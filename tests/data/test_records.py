"""Record parsing and bad input: each bad record kind is skipped-and-counted by reason (the good records come
out exactly as without it: never misaligned) or raises an error naming the line, the id and the problem."""
import json
import re

import numpy as np
import PIL.Image
import pytest

from glmv_jax.data.pipeline import make_pipeline
from glmv_jax.data.records import BadRecordError, parse_record
from glmv_jax.data.synthetic import generate

CFG = dict(seq_len=96, batch_size=2, patch_budget=256, shuffle=False, num_epochs=1, read_threads=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """img/ with good images plus a truncated PNG and a text file named .png; good JSON lines."""
    root = tmp_path_factory.mktemp("bad")
    (root / "img").mkdir()
    good = generate("counting", 4, seed=11, image_size=28)
    lines = []
    for i, r in enumerate(good):
        r["images"][0].save(root / "img" / f"{i}.png")
        lines.append(json.dumps({**r, "images": [f"img/{i}.png"]}))
    png = (root / "img" / "0.png").read_bytes()
    (root / "img" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "img" / "notimage.png").write_text("this is not a PNG")
    return root, lines


def sft(rid, images, question="<image>How many?", answer="<think>x</think><answer>1</answer>"):
    return json.dumps({"id": rid, "images": images, "messages": [{"role": "user", "content": question},
                                                                 {"role": "assistant", "content": answer}]})


BAD = {   # reason -> the bad JSONL line (inserted as line 3 of the manifest)
    "unreadable_image": sft("trunc", ["img/truncated.png"]),
    "missing_image": sft("gone", ["img/does_not_exist.png"]),
    "invalid_json": '{"id": "broken", "images": ["img/0.png"], "messages": [',
    "missing_field": json.dumps({"id": "nomsg", "images": ["img/0.png"], "kind": "sft"}),
    "too_long": sft("long", ["img/0.png"], answer="<think>" + "count them all " * 40 + "</think>"),
    "placeholder_mismatch": sft("twomarks", ["img/0.png"], question="<image><image>How many?"),
}
ERROR_TEXT = {"unreadable_image": "cannot decode image", "missing_image": "image file not found",
              "invalid_json": "not valid JSON", "missing_field": "required field 'messages' is missing",
              "too_long": "exceed the packed length T=96", "placeholder_mismatch": "2 <image> placeholder"}


def write_manifest(root, lines, name):
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_record_skipped_and_counted(reason, tok, proc, data_dir):
    root, good = data_dir
    clean = list(make_pipeline(CFG, tok, proc, sources=write_manifest(root, good, "clean.jsonl")))
    it = make_pipeline(CFG, tok, proc, sources=write_manifest(root, good[:2] + [BAD[reason]] + good[2:], f"{reason}.jsonl"))
    batches = list(it)
    assert it.stats()["skipped"] == {reason: 1} and it.stats()["samples"] == len(good)
    assert_same_batches(batches, clean)          # the good records are untouched and aligned


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_record_raises_naming_record(reason, tok, proc, data_dir):
    root, good = data_dir
    path = write_manifest(root, good[:2] + [BAD[reason]] + good[2:], f"{reason}-raise.jsonl")
    it = make_pipeline(CFG, tok, proc, sources=path, on_bad_record="raise")
    with pytest.raises(BadRecordError) as info:
        list(it)
    message = str(info.value)
    assert f"{reason}-raise.jsonl:3" in message and reason in message and ERROR_TEXT[reason] in message
    if reason != "invalid_json":
        assert f"id={json.loads(BAD[reason])['id']}" in message
    assert info.value.reason == reason


def element(record, base_dir=None):
    return {"raw": record, "where": "memory[0]", "base_dir": base_dir}


def test_kinds_are_inferred_and_normalized():
    img = PIL.Image.new("RGB", (28, 28))
    cap = parse_record(element({"id": "c", "images": [img], "text": "a cat"}))
    assert cap["kind"] == "caption" and cap["text"] == "<image>a cat" and cap["messages"] is None
    inter = parse_record(element({"id": "i", "images": ["a.png", "/data/sub/b.png"], "text": "x <image> y <image>"}, "/data"))
    assert inter["kind"] == "interleaved" and inter["images"] == ["/data/a.png", "/data/sub/b.png"]
    ocr = parse_record(element({"id": "o", "kind": "ocr", "images": [img], "text": "HELLO"}))
    assert ocr["messages"][-1] == {"role": "assistant", "content": "HELLO"} and ocr["answer"] == "HELLO"
    gr = parse_record(element({"id": "g", "images": [img], "query": "the red circle", "boxes": [[1, 2, 30, 40]]}))
    assert gr["kind"] == "grounding" and gr["answer"] == [[1, 2, 30, 40]]
    assert gr["messages"][-1]["content"] == "<|begin_of_box|>[[1, 2, 30, 40]]<|end_of_box|>"
    vid = parse_record(element({"id": "v", "video": {"frames": ["f0.png", "f1.png"], "timestamps": [0, 0.5]},
                                "messages": [{"role": "user", "content": "<video>What happens?"}], "answer": "x"}, "/d"))
    assert vid["kind"] == "video" and vid["video"]["frames"] == ["/d/f0.png", "/d/f1.png"]
    rl = parse_record(element({"id": "r", "images": [img], "messages": [{"role": "user", "content": "<image>Q"}],
                               "answer": "3", "difficulty": 0.5, "tier": 1}))
    assert rl["kind"] == "rl" and rl["answer"] == "3" and rl["meta"] == {"tier": 1}
    raw = parse_record(element(json.dumps({"id": 7, "messages": [{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": "yo"}]})))
    assert raw["kind"] == "sft" and raw["id"] == "7"


@pytest.mark.parametrize("record, reason, text", [
    ({"images": [], "text": "no id"}, "missing_field", "'id'"),
    ({"id": "k", "kind": "poem", "text": "x"}, "invalid_field", "unknown kind 'poem'"),
    ({"id": "r", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "kind": "rl", "answer": "1"}, "invalid_field", "must end with a user turn"),
    ({"id": "r", "messages": [{"role": "user", "content": "q"}]}, "missing_field", "'answer'"),
    ({"id": "m", "messages": [{"role": "bot", "content": "q"}]}, "invalid_field", "unknown role 'bot'"),
    ({"id": "v", "video": {"frames": ["a.png"], "timestamps": [0, 1]}, "text": "<video>"}, "invalid_field",
     "one timestamp per frame"),
    ({"id": "v", "video": {"frames": ["a.png"], "timestamps": [0]}, "text": "no marker"}, "placeholder_mismatch",
     "0 <video>"),
    ({"id": "p", "kind": "interleaved", "images": [], "text": "raw <|image|> token"}, "placeholder_mismatch", "literal <|image|>"),
    ({"id": "g", "images": ["a.png"], "query": "x", "boxes": [[1, 2, 3]]}, "invalid_field", "4 numbers"),
    ({"id": "o", "kind": "ocr", "images": ["a.png", "b.png"], "text": "t"}, "placeholder_mismatch", "exactly 1"),
])
def test_invalid_records(record, reason, text):
    with pytest.raises(BadRecordError, match=re.escape(text)) as info:
        parse_record(element(record))
    assert info.value.reason == reason and "memory[0]" in str(info.value)
