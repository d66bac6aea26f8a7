"""The built-in task suite: record format, answers that agree with the pixels, tiers, determinism, disjoint
splits, errors, and full reward for every reference answer from the domain verifiers."""
import hashlib
import json
import re
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from glmv_jax.data.synthetic import DOMAINS, KINDS, answer_text, generate, tier_names, tier_weights
from glmv_jax.data.synthetic.base import COLORS

S = 56
GLM41V = re.compile(r"^<think>([^<]+)</think><answer><\|begin_of_box\|>(.+)<\|end_of_box\|></answer>$", re.S)
GLM45V = re.compile(r"^<think>([^<]+)</think>\n<\|begin_of_box\|>(.+)<\|end_of_box\|>$", re.S)


def pixels(record):
    return np.asarray(record["images"][0], dtype=np.int16)


def colored(arr):
    """Mask of saturated pixels (the background and text greys/black are unsaturated)."""
    return (arr.max(-1) - arr.min(-1)) > 60


def color_mask(arr, name):
    return np.all(arr == np.asarray(COLORS[name]), axis=-1)


def grid_box(mask):
    ys, xs = np.nonzero(mask)
    return [round(v * 1000 / mask.shape[1]) for v in (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)]


def iou(a, b):
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def check_answer_type(domain, answer):
    if domain == "counting":
        assert isinstance(answer, int) and answer >= 0
    elif domain == "math":
        assert isinstance(answer, str) and Fraction(answer) is not None
    elif domain == "ocr":
        assert isinstance(answer, str) and answer.strip() == answer and answer
    elif domain == "chart":
        assert isinstance(answer, (int, float)) and answer >= 0
    elif domain == "grounding":
        assert isinstance(answer, list) and answer
        for box in answer:
            assert len(box) == 4 and all(isinstance(v, int) and 0 <= v <= 1000 for v in box)
            assert box[0] < box[2] and box[1] < box[3]
    elif domain == "gui":
        assert set(answer) == {"action", "box"} and answer["action"] == "click"
        check_answer_type("grounding", [answer["box"]])
    elif domain == "choice":
        assert re.fullmatch(r"[A-D](,[A-D])*", answer) and answer.split(",") == sorted(set(answer.split(",")))
    json.dumps(answer)  # records are JSONL-serializable


@pytest.mark.parametrize("domain", DOMAINS)
def test_record_format(domain):
    assert len(tier_names(domain)) == 4
    for tier in range(4):
        records = generate(domain, 12, seed=3, tiers=tier)
        assert len({r["id"] for r in records}) == 12
        for r in records:
            assert set(r) == {"id", "domain", "images", "messages", "answer", "difficulty", "tier"}
            assert r["domain"] == domain and r["tier"] == tier
            assert tier / 4 <= r["difficulty"] < (tier + 1) / 4
            (image,) = r["images"]
            assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (S, S)
            user, assistant = r["messages"]
            assert user["role"] == "user" and user["content"].startswith("<image>")
            assert user["content"].count("<image>") == 1 and "<|" not in user["content"]
            assert assistant["role"] == "assistant"
            match = GLM41V.match(assistant["content"])
            assert match, assistant["content"]
            assert match.group(2) == answer_text(domain, r["answer"])
            check_answer_type(domain, r["answer"])


def test_kinds_and_styles():
    rl = generate("math", 5, kind="rl")
    sft = generate("math", 5)
    caps = generate("math", 5, kind="caption")
    for a, b, c in zip(rl, sft, caps):
        assert a["messages"] == b["messages"][:1] and a["answer"] == b["answer"]
        assert a["images"][0].tobytes() == b["images"][0].tobytes() == c["images"][0].tobytes()
        assert set(c) == {"id", "domain", "images", "text", "difficulty", "tier"} and c["text"].startswith("<image>")
    for domain in DOMAINS:
        for r in generate(domain, 8, seed=1, style="glm45v"):
            match = GLM45V.match(r["messages"][1]["content"])
            assert match and match.group(2) == answer_text(domain, r["answer"])
    assert KINDS == ("sft", "rl", "caption")


def test_deterministic_and_streamable():
    for domain in DOMAINS:
        a, b = generate(domain, 6, seed=11), generate(domain, 6, seed=11)
        assert [r["images"][0].tobytes() for r in a] == [r["images"][0].tobytes() for r in b]
        assert [r["messages"] for r in a] == [r["messages"] for r in b]
        tail = generate(domain, 3, seed=11, start=3)
        assert [r["id"] for r in tail] == [r["id"] for r in a[3:]]
        assert [r["images"][0].tobytes() for r in tail] == [r["images"][0].tobytes() for r in a[3:]]
        other = generate(domain, 6, seed=12)
        assert all(x["images"][0].tobytes() != y["images"][0].tobytes() for x, y in zip(a, other))


def _digests(records):
    return {hashlib.sha256(r["images"][0].tobytes()).hexdigest() for r in records}


@pytest.mark.parametrize("domain", DOMAINS)
def test_heldout_images_never_in_train(domain):
    """Easy tiers have few distinct scenes, so this relies on the per-record streams and the pixel noise."""
    train, held = (generate(domain, 150, split=split, tiers=0) + generate(domain, 150, split=split, start=150)
                   for split in ("train", "heldout"))
    assert len(_digests(train)) == len(_digests(held)) == 300
    assert not _digests(train) & _digests(held)
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in held)


def test_tier_mix():
    assert tier_weights("ocr").tolist() == [0.25] * 4
    assert tier_weights("ocr", 2).tolist() == [0, 0, 1, 0]
    assert tier_weights("ocr", {"digit-big": 1, 3: 3}).tolist() == [0.25, 0, 0, 0.75]
    records = generate("counting", 400, tiers=[3, 1, 0, 0])
    tiers = np.array([r["tier"] for r in records])
    assert set(tiers.tolist()) == {0, 1} and 0.65 < (tiers == 0).mean() < 0.85
    difficulty = np.array([r["difficulty"] for r in records])
    assert difficulty[tiers == 0].max() < difficulty[tiers == 1].min()


def test_other_image_sizes():
    for size in (32, 112):
        for domain in DOMAINS:
            for r in generate(domain, 8, seed=2, image_size=size):
                assert r["images"][0].size == (size, size)
                check_answer_type(domain, r["answer"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown domain 'poetry'"):
        generate("poetry", 1)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        generate("ocr", 1, split="test")
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        generate("ocr", -1)
    with pytest.raises(ValueError, match="unknown kind"):
        generate("ocr", 1, kind="dpo")
    with pytest.raises(ValueError, match="unknown response style"):
        generate("ocr", 1, style="gpt")
    with pytest.raises(ValueError, match="image_size"):
        generate("ocr", 1, image_size=8)
    with pytest.raises(ValueError, match="has tiers 0..3, got 4"):
        generate("ocr", 1, tiers=4)
    with pytest.raises(ValueError, match="needs 4 tier weights"):
        generate("ocr", 1, tiers=[1, 1])
    with pytest.raises(ValueError, match="no tier 'hardest'"):
        generate("ocr", 1, tiers={"hardest": 1})
    with pytest.raises(ValueError, match="not all zero"):
        generate("ocr", 1, tiers=[0, 0, 0, 0])
    with pytest.raises(ValueError, match="start must be"):
        generate("ocr", 1, start=-2)


# -- answers agree with the pixels -------------------------------------------------------------------------
def test_counting_matches_connected_components():
    for r in generate("counting", 60, seed=4, tiers=[1, 1, 0, 0]):  # "How many shapes" tiers
        _, n = ndimage.label(colored(pixels(r)), structure=np.ones((3, 3)))
        assert n == r["answer"], r["messages"]


def test_grounding_boxes_match_pixels():
    for r in generate("grounding", 80, seed=4):
        arr = pixels(r)
        color = re.search(r"(?:the|all) (\w+) (?:shapes|circle|square|triangle)", r["messages"][0]["content"]).group(1)
        labels, n = ndimage.label(color_mask(arr, color), structure=np.ones((3, 3)))
        component_boxes = [grid_box(labels == k) for k in range(1, n + 1)]
        for box in r["answer"]:  # every answer box is drawn in the asked colour
            assert max(iou(box, c) for c in component_boxes) > 0.8, (r["messages"], box, component_boxes)
        if r["tier"] == 3:  # "all <colour> shapes": every shape of that colour is answered
            assert len(r["answer"]) == n


def test_gui_box_is_a_button_outline():
    for r in generate("gui", 60, seed=4):
        arr = pixels(r)
        x0, y0, x1, y1 = (round(v * S / 1000) for v in r["answer"]["box"])
        perimeter = np.concatenate([arr[y0, x0:x1], arr[y1 - 1, x0:x1], arr[y0:y1, x0], arr[y0:y1, x1 - 1]])
        assert (perimeter == 40).all(), (r["messages"], r["answer"])  # the box is exactly the button's outline
        if r["tier"] == 1:  # named by colour: the box is filled with it
            color = re.search(r"Click the (\w+) button", r["messages"][0]["content"]).group(1)
            assert color_mask(arr[y0:y1, x0:x1], color).mean() > 0.5


def test_chart_bar_heights_match_values():
    for r in generate("chart", 60, seed=4, kind="caption"):
        arr = pixels(r)
        pairs = re.findall(r"(\w+) (\d+)", r["text"].split(":")[1])
        heights = {c: np.ptp(np.nonzero(color_mask(arr, c).any(axis=1))[0]) + 1 for c, _ in pairs}
        top = max(pairs, key=lambda p: int(p[1]))
        scale = heights[top[0]] / int(top[1])
        for c, v in pairs:
            assert abs(heights[c] - int(v) * scale) <= 1.5, (r["text"], heights)


def test_choice_single_shape_matches_answer():
    fill = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
    for r in generate("choice", 60, seed=4, tiers=[1, 1, 0, 0]):
        mask = colored(pixels(r))
        ys, xs = np.nonzero(mask)
        ratio = mask.sum() / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
        kind = min(fill, key=lambda k: abs(fill[k] - ratio))
        options = dict(re.findall(r"^([A-D])\. (\w+)$", r["messages"][0]["content"], re.M))
        assert options[r["answer"]] == kind, (r["messages"], ratio)


def test_text_tasks_draw_ink():
    for domain in ("math", "ocr"):
        for r in generate(domain, 40, seed=4):
            arr = pixels(r)
            assert (arr.min(-1) < 200).sum() > 10  # dark or coloured glyph pixels exist


# -- every reference answer earns full reward --------------------------------------------------------------
def test_reference_answers_earn_full_reward():
    rewards = pytest.importorskip("glmv_jax.rewards")
    if not hasattr(rewards, "compute_reward"):
        pytest.skip("glmv_jax.rewards.compute_reward does not exist yet")
    for domain in DOMAINS:
        for style in ("glm41v", "glm45v"):
            records = [r for tier in range(4) for r in generate(domain, 10, seed=6, style=style, tiers=tier)]
            for r, other in zip(records, records[1:] + records[:1]):
                response = r["messages"][1]["content"]
                result = rewards.compute_reward(domain, response, r["answer"], style=style)
                assert result.format_ok and result.reward == 1.0, (domain, style, response, result)
                exact = domain in ("counting", "math", "ocr", "choice")  # boxes / charts have a tolerance
                if exact and answer_text(domain, other["answer"]) != answer_text(domain, r["answer"]):
                    assert rewards.compute_reward(domain, response, other["answer"], style=style).reward < 1.0
