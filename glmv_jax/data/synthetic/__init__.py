"""The built-in, procedurally generated multimodal task suite (what the embedded demo trains on).

    records = generate("counting", 64, seed=0, split="train")            # SFT records (docs/data.md section 1)
    prompts = generate("grounding", 64, seed=1, split="heldout", kind="rl", tiers=[0, 1, 1, 0])
    captions = generate("ocr", 64, kind="caption")                       # pretraining captions

Domains: counting, math, ocr, chart, grounding, gui, choice. Each has 4 tiers, easy first: tier 0 is what a
~0.5M-parameter model learns on a CPU in minutes (big fixed fonts, one digit, few objects, position
tasks), tier 1 is mid-range, tiers 2-3 need reading small glyphs or many objects (docs/data.md section 8).
Every record draws from its own RNG stream keyed by (seed, split, domain, index), so "train" and "heldout"
never share a stream, and every image carries faint per-pixel noise, so no held-out image equals a train image.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from glmv_jax.data.chat_template import STYLES, format_response, render

from . import arithmetic, chart, choice, counting, grounding, gui, ocr
from .base import SPLITS, Sample, Task, answer_text, record_rng

TASKS: dict[str, Task] = {t.domain: t for t in (counting.TASK, arithmetic.TASK, ocr.TASK, chart.TASK,
                                                 grounding.TASK, gui.TASK, choice.TASK)}
DOMAINS = tuple(TASKS)
KINDS = ("sft", "rl", "caption")

__all__ = ["DOMAINS", "KINDS", "SPLITS", "TASKS", "answer_text", "corpus_texts", "generate", "tier_names",
           "tier_weights"]


def tier_names(domain: str) -> tuple[str, ...]:
    return _task(domain).tiers


def tier_weights(domain: str, tiers=None) -> np.ndarray:
    """The tier mix as normalised weights [n_tiers]: None = uniform; an int = that tier only; a sequence of
    n_tiers weights; or a mapping {tier index or name: weight}."""
    names = _task(domain).tiers
    if tiers is None:
        weights = np.ones(len(names))
    elif isinstance(tiers, (int, np.integer)) and not isinstance(tiers, bool):
        if not 0 <= tiers < len(names):
            raise ValueError(f"{domain} has tiers 0..{len(names) - 1}, got {tiers}")
        weights = np.eye(len(names))[int(tiers)]
    elif isinstance(tiers, Mapping):
        weights = np.zeros(len(names))
        for key, w in tiers.items():
            index = names.index(key) if key in names else key
            if not isinstance(index, (int, np.integer)) or not 0 <= index < len(names):
                raise ValueError(f"{domain} has no tier {key!r}; tiers are {names}")
            weights[index] = float(w)
    elif isinstance(tiers, Sequence) and not isinstance(tiers, str):
        if len(tiers) != len(names):
            raise ValueError(f"{domain} needs {len(names)} tier weights {names}, got {len(tiers)}")
        weights = np.asarray(tiers, dtype=float)
    else:
        raise ValueError(f"tiers must be None, an int, a sequence of weights or a mapping, got {tiers!r}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"tier weights must be finite, non-negative and not all zero, got {list(weights)}")
    return weights / weights.sum()


def generate(domain: str, n: int, seed: int = 0, split: str = "train", *, kind: str = "sft", tiers=None,
             style: str = "glm41v", image_size: int = 56, start: int = 0) -> list[dict]:
    """`n` records of `domain`, indices start..start+n-1, deterministic given (seed, split, index, tiers).

    kind "sft": {"id", "domain", "images": [PIL RGB image_size^2], "messages": [user "<image>question",
    assistant response], "answer", "difficulty", "tier"}; "rl": the same without the assistant turn;
    "caption": {"id", "domain", "images", "text": "<image>caption", "difficulty", "tier"} for pretraining.
    The response is `style`'s format (glm41v: think + answer tags; glm45v: no answer tags) with the answer boxed.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if style not in STYLES:
        raise ValueError(f"unknown response style {style!r}; expected one of {STYLES}")
    records = []
    for index, tier, difficulty, sample in _samples(domain, n, seed, split, tiers, image_size, start):
        record = {"id": f"{domain}-{split}-s{seed}-{index:07d}", "domain": domain, "images": [sample.image]}
        if kind == "caption":
            record["text"] = "<image>" + sample.caption
        else:
            record["messages"] = _messages(domain, sample, style, with_answer=kind == "sft")
            record["answer"] = sample.answer
        record.update(difficulty=difficulty, tier=tier)
        records.append(record)
    return records


def corpus_texts(records_per_domain: int = 300, seed: int = 0) -> list[str]:
    """Text the suite produces, as the models see it: SFT conversations rendered by both chat templates in
    their response styles (with and without thinking), and captions. Trains the suite tokenizer."""
    texts = []
    for domain in DOMAINS:
        for _, _, _, sample in _samples(domain, records_per_domain, seed, "train", None, 56, 0):
            texts.append(render(_messages(domain, sample, "glm41v", True), "glm41v"))
            texts.append(render(_messages(domain, sample, "glm45v", True), "glm45v"))
            texts.append(render(_messages(domain, sample, "glm45v", False), "glm45v", add_generation_prompt=True,
                                enable_thinking=False))
            texts.append(sample.caption)
    return texts


def _samples(domain, n, seed, split, tiers, image_size, start):
    """Yields (index, tier, difficulty, Sample)."""
    task = _task(domain)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or not 28 <= image_size <= 1024:
        raise ValueError(f"image_size must be an int in [28, 1024], got {image_size!r}")
    weights = tier_weights(domain, tiers)
    for index in range(int(start), int(start) + int(n)):
        rng = record_rng(seed, split, domain, index)
        tier = int(rng.choice(len(weights), p=weights))
        sample = task.make(rng, tier, int(image_size))
        difficulty = round((tier + sample.within) / len(weights), 4)
        yield index, tier, difficulty, sample


def _messages(domain: str, sample: Sample, style: str, with_answer: bool) -> list[dict]:
    messages = [{"role": "user", "content": "<image>" + sample.question}]
    if with_answer:
        response = format_response(sample.think, answer_text(domain, sample.answer), sample.prefix, style)
        messages.append({"role": "assistant", "content": response})
    return messages


def _task(domain: str) -> Task:
    if domain not in TASKS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {tuple(TASKS)}")
    return TASKS[domain]
