"""Training throughput: glmv-jax's jitted train step vs HF transformers PyTorch, same config, weights, inputs.

One step = forward + next-token cross entropy on the text tokens + backward + global-norm clipping + AdamW,
fp32 on CPU. glmv-jax runs the runner's code path (train.supervised.make_loss_fn + train.step.make_train_step
+ train.optimizer.build_optimizer); PyTorch runs model(**inputs, labels=...).loss.backward(),
clip_grad_norm_ and torch.optim.AdamW.step(). Rows hold one image plus text. Reports tokens/s, the ratio,
and MFU: model FLOPs per step (3x the analytic forward of models/flops.py) / step time / the FLOP/s of a
large matmul measured in the same run (jax and torch each against their own). Appends to RESULTS.md.

    python -m benchmarks.train_step [--configs small,medium] [--repeats 2] [--batch 4] [--profile]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.forward import medium_config  # noqa: E402
from glmv_jax.config import ModelConfig  # noqa: E402
from benchmarks.common import glmv_config, interleaved  # noqa: E402
from glmv_jax.models.flops import forward_flops  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
OPTIMIZER = dict(lr=1e-4, warmup_steps=0, total_steps=1000, final_lr_fraction=1.0, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.01, clip_norm=1.0)


def small_config() -> ModelConfig:
    """~25M parameters, GLM-4.1V-shaped: 4 ViT blocks, 4 dense decoder layers, GQA, interleaved M-RoPE."""
    return glmv_config(dict(depth=4, hidden_size=384, num_heads=6, out_hidden_size=512, intermediate_size=1536,
                            patch_size=14, image_size=224),
                       dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=2), special_base=8180)


CASES = {  # name -> (config, image grid (t, h, w) in patches, text tokens per row)
    "small": (small_config, (1, 16, 16), 192),
    "medium": (medium_config, (1, 32, 32), 512),
}


def make_inputs(config: ModelConfig, batch: int, text_tokens: int, grid: tuple, seed: int = 0) -> dict:
    """HF-processor-shaped rows: text, one image (grid in patches), text; random ids below the special ids."""
    rng = np.random.default_rng(seed)
    t, h, w = grid
    half = text_tokens // 2
    words = lambda n: rng.integers(2, config.image_token_id - 16, n).tolist()
    row = (words(half) + [config.image_start_token_id] + [config.image_token_id] * (t * h * w // 4) +
           [config.image_end_token_id] + words(text_tokens - half))
    input_ids = np.array([row] * batch, np.int64)
    pixel_values = rng.standard_normal((batch * t * h * w, config.vision.patch_dim)).astype(np.float32)
    return dict(input_ids=input_ids, attention_mask=np.ones_like(input_ids),
                mm_token_type_ids=(input_ids == config.image_token_id).astype(np.int64),
                pixel_values=pixel_values, image_grid_thw=np.array([grid] * batch, np.int64))


def jax_batch(config: ModelConfig, inputs: dict) -> dict:
    """BATCH.md batch of the HF inputs; loss on every position whose next token is text (HF's labels with
    image tokens set to -100, shifted)."""
    from glmv_jax.models.glmv import prepare_inputs
    batch, _ = prepare_inputs(config, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                              inputs["image_grid_thw"], mm_token_type_ids=inputs["mm_token_type_ids"])
    ids = batch["input_ids"]
    batch["targets"] = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], 1)
    next_is_text = np.concatenate([batch["token_type"][:, 1:] == 0, np.zeros_like(ids[:, :1], bool)], 1)
    batch["loss_mask"] = next_is_text.astype(np.float32)
    return batch


def torch_labels(config: ModelConfig, input_ids: np.ndarray) -> np.ndarray:
    return np.where(input_ids == config.image_token_id, -100, input_ids)


def jax_runner(config: ModelConfig, params, batch: dict):
    """(run one step, first-step loss): the runner's loss, step and optimizer on one device."""
    import jax
    from glmv_jax.train.optimizer import build_optimizer
    from glmv_jax.train.state import train_state_from_params
    from glmv_jax.train.step import make_train_step
    from glmv_jax.train.supervised import make_loss_fn
    optimizer = build_optimizer(OPTIMIZER)
    step = make_train_step(make_loss_fn(types.SimpleNamespace(model_config=config)), optimizer)
    holder = {"state": train_state_from_params(params, optimizer, jax.random.key(0))}
    batch = jax.device_put(batch)
    losses = []

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        losses.append(metrics["loss"])
        jax.block_until_ready(holder["state"].params)

    run()
    assert int(jax.device_get(holder["state"].nonfinite_count)) == 0, "non-finite step: the timing would skip work"
    return run, float(losses[0])


def torch_runner(model, inputs: dict, labels: np.ndarray, threads: int):
    """(run one step with `threads` intra-op threads, first-step loss) for the HF model."""
    import torch
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=OPTIMIZER["lr"], betas=(OPTIMIZER["b1"], OPTIMIZER["b2"]),
                                  eps=OPTIMIZER["eps"], weight_decay=OPTIMIZER["weight_decay"])
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    tensors["labels"] = torch.from_numpy(labels)
    losses = []

    def run():
        torch.set_num_threads(threads)
        optimizer.zero_grad(set_to_none=True)
        loss = model(**tensors).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIMIZER["clip_norm"])
        optimizer.step()
        losses.append(loss.item())

    run()
    return run, losses[0]


def matmul_contenders(thread_counts, n: int = 2048) -> tuple[dict, float]:
    """Same-run peaks: a jitted jax matmul and a torch matmul per thread count."""
    import jax
    import jax.numpy as jnp
    import torch
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    ja, ta = jnp.asarray(a), torch.from_numpy(a)
    f = jax.jit(lambda x: x @ x)
    f(ja).block_until_ready()

    def torch_mm(threads):
        def run():
            torch.set_num_threads(threads)
            return ta @ ta
        return run

    out = {"peak jax": lambda: f(ja).block_until_ready()}
    out.update({f"peak torch {k}t": torch_mm(k) for k in thread_counts})
    return out, 2.0 * n ** 3


def measure(name: str, batch_rows: int, repeats: int, thread_counts, profile: bool = False) -> dict:
    """Builds both sides of one case, then times them in interleaved rounds beside the matmul peaks."""
    import jax
    from glmv_jax.convert.hf import load_pretrained
    from tests.hf_oracle import save_hf_model
    make_config, grid, text_tokens = CASES[name]
    config = make_config()
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = save_hf_model(config, tmp)
        _, params = load_pretrained(tmp)
    try:
        hf_model.set_attn_implementation("sdpa")          # HF's default: PyTorch's fused attention kernels
    except Exception:                                     # noqa: BLE001 (keep eager where sdpa is not offered)
        pass
    inputs = make_inputs(config, batch_rows, text_tokens, grid=grid)
    start = time.perf_counter()
    run_jax, jax_loss = jax_runner(config, jax.device_put(params), jax_batch(config, inputs))
    compile_s = time.perf_counter() - start
    labels = torch_labels(config, inputs["input_ids"])
    contenders, losses = {"glmv-jax (jit)": run_jax}, {"glmv-jax (jit)": jax_loss}
    for i, k in enumerate(thread_counts):     # one model: later runners start from already-updated weights
        key = f"HF PyTorch ({hf_model.config._attn_implementation}, {k} thread{'s' if k > 1 else ''})"
        contenders[key], loss = torch_runner(hf_model, inputs, labels, k)
        losses[key] = loss if i == 0 else None
    peaks, peak_flops = matmul_contenders(thread_counts)
    times = interleaved({**contenders, **peaks}, repeats)
    ops = profile_ops(run_jax) if profile else []
    seq = inputs["input_ids"].shape[1]
    return dict(name=name, params=sum(p.numel() for p in hf_model.parameters()), batch=batch_rows, seq=seq,
                text=text_tokens, grid=grid, flops=3.0 * forward_flops(config, batch_rows, seq, [grid]),
                times=times, losses=losses, compile_s=compile_s,
                peaks={k: peak_flops / times[k][0] for k in peaks}, threads=list(thread_counts), ops=ops)


OP_GROUPS = (("dots (ynn/dot fusions)", ("ynn_fusion", "dot")), ("scan residual slices", ("dynamic-slice", "dynamic-update-slice")),
             ("layout copies / transposes", ("copy", "transpose")), ("broadcasts (buffer fills)", ("broadcast",)),
             ("gather / scatter", ("gather", "scatter")))


def profile_ops(run, steps: int = 1) -> list[tuple[str, float]]:
    """Share of XLA CPU op time per op group over `steps` calls of `run` (jax profiler perfetto trace)."""
    import collections
    import glob
    import gzip
    import json
    import re
    import jax
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        for _ in range(steps):
            run()
        jax.profiler.stop_trace()
        with gzip.open(glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)[0]) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith(("$", "while", "Pjit")) or "::" in name:
            continue                               # python frames, loops (their ops are counted), runtime
        base = re.sub(r"\.\d+$", "", name)
        group = next((g for g, keys in OP_GROUPS if any(k in base for k in keys)), "other fusions (elementwise)")
        totals[group] += e.get("dur", 0)
    whole = sum(totals.values()) or 1
    return [(group, t / whole) for group, t in totals.most_common()]


def peak_for(impl: str, peaks: dict) -> float:
    if impl.startswith("glmv-jax"):
        return peaks["peak jax"]
    threads = int(impl.rsplit(", ", 1)[1].split(" ")[0])
    return peaks[f"peak torch {threads}t"]


def table(results: list[dict], load: tuple) -> str:
    import jax
    import torch
    lines = [f"### train step: {datetime.datetime.now():%Y-%m-%d %H:%M} | {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, CPU fp32 | jax {jax.__version__}, torch {torch.__version__} | "
             f"load average before/after {load[0]:.1f} / {load[1]:.1f}", "",
             "One step = forward + CE on text tokens + backward + global-norm clip + AdamW; model FLOPs = 3x the "
             "analytic forward. Contenders and 2048^3 matmul peaks run in interleaved rounds (best round kept); "
             "MFU = FLOPs / wall time / the same library's same-run matmul peak at the same thread count. "
             "cpu s = process CPU time per step. First-step loss: same weights and batch on both sides.", "",
             "| config | impl | wall s/step | cpu s/step | tokens/s | GFLOP/s | matmul peak GFLOP/s | MFU | "
             "first-step loss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        what = (f"{r['name']} {r['params'] / 1e6:.0f}M, {r['batch']} x {r['seq']} tok "
                f"({r['grid'][1] * 14}px image + {r['text']} text)")
        tokens = r["batch"] * r["seq"]
        for impl, loss in r["losses"].items():
            wall, cpu = r["times"][impl]
            peak = peak_for(impl, r["peaks"])
            lines.append(f"| {what} | {impl} | {wall:.3f} | {cpu:.2f} | {tokens / wall:,.0f} | "
                         f"{r['flops'] / wall / 1e9:.1f} | {peak / 1e9:.1f} | {r['flops'] / wall / peak:.0%} | "
                         f"{'-' if loss is None else f'{loss:.4f}'} |")
    lines.append("")
    for r in results:
        jax_wall = r["times"]["glmv-jax (jit)"][0]
        torch_wall = min(t[0] for k, t in r["times"].items() if k.startswith("HF"))
        lines.append(f"- {r['name']}: glmv-jax / fastest PyTorch tokens/s = **{torch_wall / jax_wall:.2f}x**; "
                     f"jax compile + first step {r['compile_s']:.0f} s")
        if r["ops"]:
            lines.append(f"  - glmv-jax step, share of XLA op time: " +
                         ", ".join(f"{group} {share:.0%}" for group, share in r["ops"]))
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", default="small", help="comma-separated: small (~25M), medium (~115M)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--torch-threads", default=f"1,{os.cpu_count() or 1}",
                        help="PyTorch intra-op thread counts to time (its OpenMP pool degrades badly on a busy CPU)")
    parser.add_argument("--profile", action="store_true", help="also break the jax step's op time down by kind")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; expected some of {sorted(CASES)}")
    threads = sorted({int(k) for k in args.torch_threads.split(",") if k})

    load_before = os.getloadavg()[0]
    results = [measure(name, args.batch, args.repeats, threads, args.profile) for name in names]
    text = table(results, (load_before, os.getloadavg()[0]))
    print(text)
    if not args.no_append:
        previous = RESULTS.read_text() if RESULTS.exists() else ""     # re-read right before appending
        with RESULTS.open("a") as f:
            f.write(("\n" if previous and not previous.endswith("\n\n") else "") + text)


if __name__ == "__main__":
    main()
