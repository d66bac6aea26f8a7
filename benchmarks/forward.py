"""Forward throughput: glmv-jax (jitted) vs HF transformers PyTorch on the same ~100M config and inputs.

One 448x448 image (1024 patches -> 256 image tokens) plus 512 text tokens per row, batch 4, fp32, CPU.
Reports tokens/s of each, their ratio, and each one's achieved FLOP/s as a fraction of a large matmul's
FLOP/s measured in the same run (jax and torch each against their own peak). Appends to RESULTS.md.

    python -m benchmarks.forward [--repeats 5] [--batch 4]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glmv_jax.config import ModelConfig, TextConfig, VisionConfig  # noqa: E402
from glmv_jax.models.flops import forward_flops  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")


def medium_config() -> ModelConfig:
    """~115M parameters, GLM-4.1V-shaped (dense decoder, interleaved M-RoPE, GQA)."""
    vision = VisionConfig(depth=8, hidden_size=512, num_heads=8, out_hidden_size=768, intermediate_size=2048,
                          patch_size=14, image_size=336)
    text = TextConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                      num_attention_heads=12, num_key_value_heads=2, mrope_section=(8, 12, 12),
                      partial_rotary_factor=1.0, pad_token_id=0, eos_token_id=(1,))
    # head_dim 64 x 1.0 = 64 rotary dims = 32 frequencies = 8 + 12 + 12
    return ModelConfig(vision=vision, text=text, image_token_id=31990, video_token_id=31991,
                       image_start_token_id=31992, image_end_token_id=31993, video_start_token_id=31994,
                       video_end_token_id=31995).validate()


def make_inputs(config: ModelConfig, batch: int, text_tokens: int, grid=(1, 32, 32), seed=0):
    rng = np.random.default_rng(seed)
    t, h, w = grid
    n_img = t * h * w // 4
    half = text_tokens // 2
    row = (rng.integers(2, 30000, half).tolist() + [config.image_start_token_id] +
           [config.image_token_id] * n_img + [config.image_end_token_id] +
           rng.integers(2, 30000, text_tokens - half).tolist())
    input_ids = np.array([row] * batch, np.int64)
    types = (input_ids == config.image_token_id).astype(np.int64)
    pixel_values = rng.standard_normal((batch * t * h * w, config.vision.patch_dim)).astype(np.float32)
    return dict(input_ids=input_ids, attention_mask=np.ones_like(input_ids), mm_token_type_ids=types,
                pixel_values=pixel_values, image_grid_thw=np.array([grid] * batch, np.int64))


def best_time(fn, repeats: int) -> float:
    fn()   # warm-up / compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peaks(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp
    import torch
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    ja = jnp.asarray(a)
    f = jax.jit(lambda x: x @ x)
    jax_t = best_time(lambda: f(ja).block_until_ready(), repeats)
    ta = torch.from_numpy(a)
    torch_t = best_time(lambda: ta @ ta, repeats)
    flops = 2.0 * n ** 3
    return flops / jax_t, flops / torch_t


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()

    import jax
    import torch
    from glmv_jax.convert.hf import load_pretrained
    from glmv_jax.models.glmv import forward
    from tests.hf_oracle import save_hf_model

    torch.set_num_threads(os.cpu_count() or 1)
    config = medium_config()
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = save_hf_model(config, tmp)
        _, params = load_pretrained(tmp)
    n_params = sum(p.numel() for p in hf_model.parameters())
    params = jax.device_put(params)
    inputs = make_inputs(config, args.batch, args.text_tokens)
    seq = inputs["input_ids"].shape[1]
    tokens = args.batch * seq
    flops = forward_flops(config, args.batch, seq, [(1, 32, 32)])

    def run_jax():
        return np.asarray(forward(config, params, **inputs))

    torch_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def run_torch():
        with torch.inference_mode():
            return hf_model(**torch_inputs).logits

    jax_t = best_time(run_jax, args.repeats)
    torch_t = best_time(run_torch, args.repeats)
    err = float(np.abs(run_jax() - run_torch().numpy()).max() / np.abs(run_torch().numpy()).max())
    jax_peak, torch_peak = matmul_peaks()

    rows = [("glmv-jax (jit)", jax_t, jax_peak), ("HF transformers (PyTorch)", torch_t, torch_peak)]
    lines = [f"### forward: {datetime.date.today()} | {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, CPU fp32 | jax {jax.__version__}, torch {torch.__version__}",
             "", f"config: {n_params / 1e6:.1f}M params, batch {args.batch} x {seq} tokens "
             f"(one 448x448 image = 256 tokens + {args.text_tokens} text), model FLOPs/forward "
             f"{flops / 1e9:.1f} G; logits max rel diff {err:.1e}", "",
             "| impl | time/forward (s) | tokens/s | GFLOP/s | matmul peak GFLOP/s | fraction of peak |",
             "|---|---|---|---|---|---|"]
    for name, t, peak in rows:
        lines.append(f"| {name} | {t:.3f} | {tokens / t:,.0f} | {flops / t / 1e9:.1f} | {peak / 1e9:.1f} | "
                     f"{flops / t / peak:.0%} |")
    lines += ["", f"ratio glmv-jax / PyTorch tokens/s: **{torch_t / jax_t:.2f}**", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        with RESULTS.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
