"""Chat with a checkpoint about one image: render the chat template, generate, print the response.

    python -m experiments.chat --checkpoint DIR --image FILE [--prompt TEXT] [--max-new-tokens N] [--temperature T]

DIR is an HF checkpoint directory (config.json + safetensors + tokenizer.json) or a work directory of
`experiments.run` (config.json + checkpoints/, or a pipeline directory: its last stage with checkpoints).
The response is printed with special tokens (think / answer / box tags) and without the turn-ending token.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import jax

from glmv_jax.cli import doc_parser
from glmv_jax.data.transforms import Processor
from glmv_jax.generate.loading import load_model
from glmv_jax.generate.prompts import prompt_dicts
from glmv_jax.generate.sampler import answer_ids, generate, response_text


def build_parser() -> argparse.ArgumentParser:
    ap = doc_parser("python -m experiments.chat", __doc__)
    ap.add_argument("--checkpoint", required=True, help="HF checkpoint dir or experiments.run work dir")
    ap.add_argument("--image", required=True, help="image file")
    ap.add_argument("--prompt", default="Describe this image.", help="the user's text after the image")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--style", default=None, choices=["glm41v", "glm45v", "glm46v"],
                    help="chat template / answer format (default: the checkpoint's)")
    ap.add_argument("--thinking-budget", type=int, default=None,
                    help="force </think> (and <answer> for glm41v) after this many tokens of thinking")
    ap.add_argument("--min-pixels", type=int, default=None, help="image processor pixel budget (default HF's)")
    ap.add_argument("--max-pixels", type=int, default=None)
    return ap


def chat(args: argparse.Namespace) -> str:


    if not os.path.isfile(args.image):
        raise FileNotFoundError(f"image file {args.image} does not exist")
    bundle = load_model(args.checkpoint, args.style)
    processor = bundle.processor
    budget = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v is not None}
    if budget:
        processor = Processor.for_model(bundle.config, template=processor.template, **budget)
    record = {"id": "chat", "images": [os.path.abspath(args.image)], "answer": "",
              "messages": [{"role": "user", "content": "<image>" + args.prompt}]}
    prompt = prompt_dicts([record], bundle.tokenizer, processor)[0]
    style = processor.template
    stop_ids = tuple(bundle.tokenizer.stop_ids)
    force = None
    if "<answer>" in bundle.tokenizer.special_ids or style != "glm41v":
        force, extra = answer_ids(bundle.tokenizer, style)
        stop_ids += extra
    out = generate(bundle.config, bundle.params, [prompt], max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, stop_ids=stop_ids,
                   rng=jax.random.key(args.seed), thinking_budget=args.thinking_budget,
                   force_answer_ids=force if args.thinking_budget is not None else None,
                   pad_id=bundle.tokenizer.pad_id)
    return response_text(bundle.tokenizer, out["tokens"][0], out["lengths"][0])


def main(argv: Sequence[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    response = chat(args)
    print(response)
    sys.stdout.flush()
    return response


if __name__ == "__main__":
    main()
