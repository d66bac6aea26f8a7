"""Builders shared by several test modules (tokenizers, records, tiny checkpoints, reference logits)."""
from __future__ import annotations

from dataclasses import replace

import jax
import numpy as np
import PIL.Image
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from glmv_jax.config import tiny
from glmv_jax.data import tokenizer as T
from glmv_jax.data.synthetic import DOMAINS, generate
from glmv_jax.data.tokenizer import load_tokenizer
from glmv_jax.models import glmv
from tests.hf_oracle import save_hf_model

GLM_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def build_tokenizer_json(path, specials=T.SPECIAL_TOKENS):
    """A byte-level BPE with GLM's pre-tokenizer, trained on suite text; special tokens appended after the
    learned vocabulary as added tokens (as in GLM checkpoints)."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    texts = [r["messages"][0]["content"] + " " + r["messages"][1]["content"]
             for d in DOMAINS for r in generate(d, 20, seed=1)]
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tk.save(str(path))
    return path


def noise_image(seed, h, w):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def mixed_records():
    """Every record shape the transform handles: sft with one image, captions, interleaved multi-image
    (non-square), video, text-only, in a shuffled-looking order."""
    recs = generate("counting", 4, seed=1, image_size=28) + generate("grounding", 2, seed=2, image_size=28)
    recs += generate("ocr", 3, seed=3, kind="caption", image_size=28)
    recs.append({"id": "inter", "images": [noise_image(0, 24, 40), noise_image(1, 36, 20)],
                 "text": "left <image> then <image> right"})
    recs.append({"id": "vid", "video": {"frames": [noise_image(i, 24, 32) for i in range(3)],
                                        "timestamps": [0.0, 0.5, 1.0]}, "text": "<video>A short clip."})
    recs.append({"id": "textonly", "messages": [{"role": "user", "content": "Say 7."},
                                                {"role": "assistant", "content": "<think>ok</think><answer>7</answer>"}]})
    order = np.random.default_rng(0).permutation(len(recs))
    return [recs[i] for i in order]


def config_for(tok):
    ids = tok.special_ids
    base = tiny()
    return replace(base, text=replace(base.text, vocab_size=tok.vocab_size), image_token_id=tok.image_id,
                   video_token_id=tok.video_id, image_start_token_id=ids["<|begin_of_image|>"],
                   image_end_token_id=ids["<|end_of_image|>"], video_start_token_id=ids["<|begin_of_video|>"],
                   video_end_token_id=ids["<|end_of_video|>"]).validate()


SPANS = {"image": [("image", (1, 4, 6))], "video": [("video", (2, 4, 4))], "text": []}


def full_logits(config, params, inputs: dict, extra: np.ndarray) -> np.ndarray:
    """Logits [T, V] of one prompt followed by `extra` tokens, by the uncached forward."""
    args = {k: v for k, v in inputs.items() if k not in ("mm_token_type_ids", "attention_mask")}
    args["input_ids"] = np.concatenate([inputs["input_ids"], np.asarray(extra, np.int64)[None]], axis=1)
    return np.asarray(glmv.forward(config, params, **args))[0]


def prompt_of(config, inputs: dict) -> dict:
    """A PromptTransform-style dict from processor-shaped inputs of one prompt."""
    batch, delta = glmv.prepare_inputs(config, **inputs)
    out = dict(input_ids=batch["input_ids"][0], token_type=batch["token_type"][0],
               position_ids=batch["position_ids"][:, 0], rope_delta=int(delta[0]))
    if "pixel_values" in batch:
        out.update(pixel_values=batch["pixel_values"], patch_pos=batch["patch_pos"], patch_grid=batch["patch_grid"],
                   patch_frame=batch["patch_segment"] - 1)
    return out


def random_params(config, seed: int = 3, std: float = 0.2):
    """Random weights of std `std` (norm scales 1 + 0.1 noise), drawn in numpy on the init's shapes (no init
    compile)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        return 1.0 + 0.1 * noise if "scale" in jax.tree_util.keystr(path) else std * noise
    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(lambda: glmv.init_params(config, 0)))


def skewed_stop_ids(tokens: np.ndarray, short: np.ndarray, start: int) -> list[int]:
    """Stop ids that end rows early: for each `short` row (short [R] bool) the first token of tokens [R, N] at
    position >= start that no long row emits. Generating again with them (same rng), the long rows run as
    before and each short row ends at or before that position (earlier where it emits another one)."""
    long_tokens = set(tokens[~short].ravel().tolist())
    stops = set()
    for r in np.flatnonzero(short):
        stop = next((int(t) for t in tokens[r, start:] if int(t) not in long_tokens), None)
        if stop is None:
            raise ValueError(f"row {r} emits no token after position {start} that the long rows do not")
        stops.add(stop)
    return sorted(stops)


def rel_err(out, ref) -> float:
    return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


def tiny_hf_dir(path):
    """An HF checkpoint directory of the tiny model with a tokenizer.json trained on suite text, the model's
    vocabulary and special ids taken from that tokenizer."""
    build_tokenizer_json(path / "tokenizer.json")
    tok = load_tokenizer(path)
    base, ids = tiny(), tok.special_ids
    cfg = base.replace(text=replace(base.text, vocab_size=tok.vocab_size, pad_token_id=tok.pad_id,
                                    eos_token_id=tuple(tok.stop_ids)),
                       image_token_id=tok.image_id, video_token_id=tok.video_id,
                       image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
                       video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"])
    save_hf_model(cfg, path)
    return path
