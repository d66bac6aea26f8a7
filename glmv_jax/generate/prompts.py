"""Generation's prompt preparation: records -> prompt dicts -> one left-padded prompt batch (numpy).

    prompts = prompt_dicts(records, tokenizer, processor)     # transforms.PromptTransform dicts
    batch = batch_prompts(prompts, num_samples=4, pad_id=0)   # rows repeated per sample, vision shared

The batch layout (keys, bucketed sizes, patch rows, patch_frames) is the contract of glmv_jax/batch.py.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from glmv_jax.batch import bucket, check_prompt, pack_patches, patch_frames, rope_delta
from glmv_jax.data.transforms import PromptTransform


def prompt_dicts(records: Sequence[dict], tokenizer, processor, **checks) -> list[dict]:
    """Record dicts (data.records; an optional "base_dir" resolves relative image paths, an optional "_where"
    names the record's origin) -> prompt dicts; the first bad record raises. checks: PromptTransform's
    data_root / max_image_pixels (pipeline.image_checks of the data config)."""
    transform = PromptTransform(tokenizer, processor, **checks)
    out = []
    for i, rec in enumerate(records):
        element = {"raw": {k: v for k, v in rec.items() if k not in ("base_dir", "_where")},
                   "where": rec.get("_where", f"prompt[{i}]"), "base_dir": rec.get("base_dir")}
        prompt = transform.map(element)
        if not isinstance(prompt, dict):
            raise prompt.error()
        out.append(prompt)
    return out


def batch_prompts(prompts: Sequence[dict], num_samples: int = 1, *, pad_id: int = 0, merge_area: int = 4,
                  min_length: int = 16, min_patches: int = 64, frame_len: int | None = None,
                  frames: int | None = None) -> dict[str, np.ndarray]:
    """Prompt dicts -> a left-padded batch of len(prompts) * num_samples rows (prompt i at rows
    i*num_samples .. (i+1)*num_samples - 1), lengths bucketed (batch.bucket) so recompiles are rare.

    Keys: input_ids, segment_ids (1 prompt, 0 padding), position_ids [3, B, Tp], token_type [B, Tp],
    prompt_len [B], rope_delta [B], vision_index [B, Tp] (the merged feature each vision token takes) and,
    when any prompt has vision, pixel_values [Np, Pd], patch_pos, patch_grid [Np, 2], patch_segment [Np]
    holding each distinct prompt's patches once (in prompt order, each in its token order), and patch_frames
    [F, L] (the ViT's per-frame attention layout: batch.patch_frames(patch_segment, frame_len, frames))."""
    if not prompts:
        raise ValueError("no prompts to batch")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    counts = [check_prompt(i, p, merge_area) for i, p in enumerate(prompts)]
    lengths = np.asarray([len(p["input_ids"]) for p in prompts])
    tp = bucket(int(lengths.max()), min_length)
    rows = len(prompts) * num_samples
    out = dict(input_ids=np.full((rows, tp), pad_id, np.int32), segment_ids=np.zeros((rows, tp), np.int32),
               position_ids=np.zeros((3, rows, tp), np.int32), token_type=np.zeros((rows, tp), np.int32),
               vision_index=np.zeros((rows, tp), np.int32), prompt_len=np.repeat(lengths, num_samples).astype(np.int32),
               rope_delta=np.repeat([rope_delta(p) for p in prompts], num_samples).astype(np.int32))
    offset = 0
    for i, (p, n_vis) in enumerate(zip(prompts, counts)):
        length = lengths[i]
        types = np.asarray(p["token_type"], np.int32)
        index = np.zeros(length, np.int32)
        index[types > 0] = offset + np.arange(n_vis)
        for r in range(i * num_samples, (i + 1) * num_samples):
            sl = slice(tp - length, tp)
            out["input_ids"][r, sl] = p["input_ids"]
            out["segment_ids"][r, sl] = 1
            out["position_ids"][:, r, sl] = p["position_ids"]
            out["token_type"][r, sl] = types
            out["vision_index"][r, sl] = index
        offset += n_vis
    if offset:
        out.update(pack_patches(prompts, bucket(offset * merge_area, min_patches)))
        out["patch_frames"] = patch_frames(out["patch_segment"], frame_len, frames)
    return out
