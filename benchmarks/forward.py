"""Forward throughput: glmv-jax (jitted) vs HF transformers PyTorch on the same ~115M config and inputs.

One 448x448 image (1024 patches -> 256 image tokens) plus 512 text tokens per row, batch 4, fp32, CPU.
Reports tokens/s of each, their ratio, and each one's achieved FLOP/s as a fraction of a large matmul's
FLOP/s measured in the same run (jax and torch each against their own peak). HF runs twice: with the eager
attention the parity tests use, and with "sdpa" (HF's default, PyTorch's fused attention kernels).

The machine is shared, so every round runs each contender once, the matmul peaks included, one after the
other: all see the same load, and the best round of each is kept. Process CPU time is reported beside wall
time (less sensitive to other jobs). `--parts` adds the ViT alone and the decoder + lm_head alone.
Appends the table to RESULTS.md.

    python -m benchmarks.forward [--repeats 5] [--batch 4] [--parts]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glmv_jax.config import ModelConfig  # noqa: E402
from benchmarks.common import glmv_config, interleaved  # noqa: E402
from glmv_jax.models.flops import forward_flops  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")


def medium_config() -> ModelConfig:
    """~115M parameters, GLM-4.1V-shaped (dense decoder, interleaved M-RoPE, GQA)."""
    # head_dim 64 x 1.0 = 64 rotary dims = 32 frequencies = 8 + 12 + 12
    return glmv_config(dict(depth=8, hidden_size=512, num_heads=8, out_hidden_size=768, intermediate_size=2048,
                            patch_size=14, image_size=336),
                       dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                            num_attention_heads=12, num_key_value_heads=2))


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


def matmul_contenders(n: int = 2048) -> tuple[dict, float]:
    import jax
    import jax.numpy as jnp
    import torch
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    ja, ta = jnp.asarray(a), torch.from_numpy(a)
    f = jax.jit(lambda x: x @ x)
    return {"jax matmul": lambda: f(ja).block_until_ready(), "torch matmul": lambda: ta @ ta}, 2.0 * n ** 3


def part_contenders(config, params, hf_model, inputs) -> dict:
    """The ViT alone (jax, HF eager) and the decoder + lm_head alone over [B, T, D] embeddings."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from glmv_jax.models import glmv
    batch, _ = glmv.prepare_inputs(config, **inputs)
    vit = glmv._jitted_vision(config)
    keys = ("pixel_values", "patch_pos", "patch_grid", "patch_segment", "patch_frames")
    vit_args = {k: jnp.asarray(batch[k]) for k in keys}
    graphdef, _ = glmv.model_graph(config)

    @jax.jit
    def decoder(params, x, position_ids, segment_ids):
        model = nnx.merge(graphdef, params)
        hidden, _ = model.text(x, model.text.context(position_ids, segment_ids))
        return jnp.einsum("BTD,DV->BTV", hidden, model.lm_head.kernel[...])

    x = np.random.default_rng(1).standard_normal(batch["input_ids"].shape + (config.text.hidden_size,))
    x = x.astype(np.float32)
    dec_args = (params, jnp.asarray(x), jnp.asarray(batch["position_ids"]), jnp.asarray(batch["segment_ids"]))
    pixels, grid = torch.from_numpy(inputs["pixel_values"]), torch.from_numpy(inputs["image_grid_thw"])
    tx, tpos = torch.from_numpy(x), torch.from_numpy(batch["position_ids"].astype(np.int64))
    tmask = torch.from_numpy(inputs["attention_mask"])

    def hf_vit():
        with torch.inference_mode():
            return hf_model.model.visual(pixels, grid_thw=grid)

    def hf_decoder():
        with torch.inference_mode():
            hidden = hf_model.model.language_model(inputs_embeds=tx, position_ids=tpos, attention_mask=tmask)
            return hf_model.lm_head(hidden.last_hidden_state)

    return {"ViT jax": lambda: vit(params, **vit_args).block_until_ready(), "ViT HF eager": hf_vit,
            "decoder+lm_head jax": lambda: decoder(*dec_args).block_until_ready(),
            "decoder+lm_head HF eager": hf_decoder}


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--parts", action="store_true", help="also time the ViT and the decoder alone")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()

    import copy

    import jax
    import torch
    from glmv_jax.convert.hf import load_pretrained
    from glmv_jax.models.flops import text_flops, vision_flops
    from glmv_jax.models.glmv import forward
    from tests.hf_oracle import save_hf_model

    torch.set_num_threads(os.cpu_count() or 1)
    config = medium_config()
    with tempfile.TemporaryDirectory() as tmp:
        hf_eager = save_hf_model(config, tmp)
        _, params = load_pretrained(tmp)
    hf_sdpa = copy.deepcopy(hf_eager)
    hf_sdpa.set_attn_implementation("sdpa")
    n_params = sum(p.numel() for p in hf_eager.parameters())
    params = jax.device_put(params)
    inputs = make_inputs(config, args.batch, args.text_tokens)
    seq = inputs["input_ids"].shape[1]
    tokens = args.batch * seq
    grids = [(1, 32, 32)]
    flops = forward_flops(config, args.batch, seq, grids)
    torch_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def hf_run(model):
        def run():
            with torch.inference_mode():
                return model(**torch_inputs).logits
        return run

    contenders = {"glmv-jax (jit)": lambda: np.asarray(forward(config, params, **inputs)),
                  "HF transformers eager": hf_run(hf_eager), "HF transformers sdpa": hf_run(hf_sdpa)}
    peaks, peak_flops = matmul_contenders()
    contenders.update(peaks)
    work = {name: flops for name in contenders}
    work.update({"jax matmul": peak_flops, "torch matmul": peak_flops})
    if args.parts:
        parts = part_contenders(config, params, hf_eager, inputs)
        contenders.update(parts)
        work.update({name: args.batch * vision_flops(config, grids) for name in parts if name.startswith("ViT")})
        work.update({name: text_flops(config, args.batch, seq) for name in parts if name.startswith("decoder")})
    load_before = load_average()
    best = interleaved(contenders, args.repeats, warmup=True)
    load_after = load_average()
    ours = np.asarray(forward(config, params, **inputs))
    errors = {name: float(np.abs(ours - hf_run(m)().numpy()).max() / np.abs(hf_run(m)().numpy()).max())
              for name, m in (("eager", hf_eager), ("sdpa", hf_sdpa))}

    peak = {name: peak_flops / best["jax matmul" if "jax" in name else "torch matmul"][0] for name in best}
    rows = [name for name in best if "matmul" not in name]
    lines = [f"### forward: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU fp32 | jax {jax.__version__},"
             f" torch {torch.__version__} | load average {load_before} before, {load_after} after",
             "", f"config: {n_params / 1e6:.1f}M params, batch {args.batch} x {seq} tokens (one 448x448 image = 256 "
             f"tokens + {args.text_tokens} text), model FLOPs/forward {flops / 1e9:.1f} G; logits max rel diff vs "
             f"HF eager {errors['eager']:.1e}, vs HF sdpa {errors['sdpa']:.1e}; best of {args.repeats} interleaved "
             "rounds", "",
             f"same-run matmul peak (2048^3): jax {peak_flops / best['jax matmul'][0] / 1e9:.1f}, torch "
             f"{peak_flops / best['torch matmul'][0] / 1e9:.1f} GFLOP/s", "",
             "| impl | wall s | CPU s | tokens/s | GFLOP/s | fraction of own matmul peak |",
             "|---|---|---|---|---|---|"]
    for name in rows:
        wall, cpu = best[name]
        tok = f"{tokens / wall:,.0f}" if name in ("glmv-jax (jit)",) or name.startswith("HF") else "-"
        lines.append(f"| {name} | {wall:.3f} | {cpu:.3f} | {tok} | {work[name] / wall / 1e9:.1f} | "
                     f"{work[name] / wall / peak[name]:.0%} |")
    jax_t = best["glmv-jax (jit)"][0]
    lines += ["", f"ratio glmv-jax / PyTorch tokens/s: **{best['HF transformers eager'][0] / jax_t:.2f}** vs HF eager, "
              f"**{best['HF transformers sdpa'][0] / jax_t:.2f}** vs HF sdpa", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        with RESULTS.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
