"""How the train step scales: compile time vs decoder depth (scanned vs unrolled layers), train-step MFU on
this CPU, and (--gpu) bf16 MFU of a ~1B dense config and of the tiny MoE on a GPU.

The step is the runner's (train.supervised.make_loss_fn + train.step.make_train_step + AdamW with
clipping), on train_step.py's ~25M GLM-4.1V-shaped config and HF-processor-shaped rows (one image + text).
  compile  jit trace+lower and XLA compile of the step for 2, 4, 8, 16 decoder layers (ViT depth fixed),
           scan_layers=True vs False; shape-only inputs (no params built), persistent compilation cache off,
           and every (depth, scan) is a new program, so each number is a real compile.
  mfu      step time in interleaved rounds with a 2048^3 matmul (glmv_jax.train.metrics.measure_peak_flops)
           measured in the same rounds; MFU = 3 x analytic forward FLOPs (models/flops.py) / step time / peak.
  --gpu    bf16 compute (fp32 master weights), attention "auto" (cuDNN flash attention on GPUs): MFU against
           the accelerator's data-sheet bf16 peak and against a bf16 matmul measured in the same run.
           --small shrinks the shapes so the same code path runs (and is checked) on CPU.

    python -m benchmarks.scale [--parts compile,mfu] [--layers 2,4,8,16] [--repeats 3] [--no-append]
    python -m benchmarks.scale --gpu [--small]
"""

from __future__ import annotations

import argparse
import math
import sys
import types
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import abstract_params, append_results, glmv_config, machine_line, timed, uptime  # noqa: E402
from benchmarks.train_step import OPTIMIZER, jax_batch, jax_runner, make_inputs, small_config  # noqa: E402
from glmv_jax.config import ModelConfig, tiny  # noqa: E402
from glmv_jax.models.flops import forward_flops  # noqa: E402

# Data-sheet dense bf16 peaks (FLOP/s) by device_kind substring, first match wins.
DATASHEET_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
                  ("A100", 312e12), ("L4", 121e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
                  ("TPU v5p", 459e12), ("TPU v6 lite", 918e12))
CPU_ROWS = dict(batch=4, text=192, grid=(1, 16, 16))          # train_step.py's "small" case


def with_depth(config: ModelConfig, layers: int, scan: bool) -> ModelConfig:
    return replace(config, scan_layers=scan, text=replace(config.text, num_hidden_layers=layers)).validate()


def count_params(config: ModelConfig) -> int:
    import jax
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))


def millions(n: int) -> str:
    return f"{n / 1e6:,.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


def loss_fn_for(config: ModelConfig):
    from glmv_jax.train.supervised import make_loss_fn
    return make_loss_fn(types.SimpleNamespace(model_config=config))


def rows(config: ModelConfig, batch: int, text: int, grid: tuple) -> tuple[dict, int]:
    """(BATCH.md batch of `batch` rows: text, one image of `grid` patches, text; tokens per row)."""
    inputs = make_inputs(config, batch, text, grid=grid)
    return jax_batch(config, inputs), inputs["input_ids"].shape[1]


# ---------------------------------------------------------------------------------- compile time

def compile_time(config: ModelConfig, batch: dict) -> dict:
    """Trace+lower and compile (wall, CPU seconds) of the train step, from shapes alone."""
    from glmv_jax.train.optimizer import build_optimizer
    from glmv_jax.train.state import abstract_train_state
    from glmv_jax.train.step import make_train_step
    optimizer = build_optimizer(OPTIMIZER)
    state = abstract_train_state(optimizer, abstract_params(config))
    step = make_train_step(loss_fn_for(config), optimizer)
    lowered, lower_wall, lower_cpu = timed(lambda: step.lower(state, batch))
    _, compile_wall, compile_cpu = timed(lowered.compile)
    return dict(lower=(lower_wall, lower_cpu), compile=(compile_wall, compile_cpu))


def compile_section(layer_counts: list[int]) -> str:
    import jax
    jax.config.update("jax_enable_compilation_cache", False)
    before = uptime()
    base = small_config()
    batch, seq = rows(base, **CPU_ROWS)
    compile_time(with_depth(base, layer_counts[0], True), batch)     # untimed: one-time XLA/LLVM start-up
    results = {}
    for layers in layer_counts:
        for scan in (True, False):
            results[layers, scan] = compile_time(with_depth(base, layers, scan), batch)
            r = results[layers, scan]
            print(f"  compile: {layers} layers, scan={scan}: lower {r['lower'][0]:.1f} s, "
                  f"compile {r['compile'][0]:.1f} s (cpu {r['compile'][1]:.1f} s)", flush=True)
    lines = [f"### scale: train-step compile time vs decoder depth | {machine_line()}", "",
             f"`{before}` (before). Config: train_step.py's small (512 wide, {base.vision.depth} ViT blocks "
             f"fixed), batch {CPU_ROWS['batch']} x {seq} tokens, fp32, default XLA options, compilation cache "
             "off, one untimed warm-up compile first; lower = jit trace + lowering to HLO, compile = XLA compile; "
             "seconds wall (process CPU).", "",
             "| decoder layers | scan: lower | scan: compile | unrolled: lower | unrolled: compile |",
             "|---|---|---|---|---|"]
    fmt = lambda t: f"{t[0]:.1f} ({t[1]:.1f})"
    for layers in layer_counts:
        s, u = results[layers, True], results[layers, False]
        lines.append(f"| {layers} | {fmt(s['lower'])} | {fmt(s['compile'])} | {fmt(u['lower'])} | "
                     f"{fmt(u['compile'])} |")
    lines.append(f"\n`{uptime()}` (after).\n")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- MFU

def interleaved_mfu(cases: dict, repeats: int, peak_n: int, peak_dtype) -> tuple[dict, float]:
    """cases: name -> run(); `repeats` rounds of one run of each, then a matmul peak (all under the same
    load) -> (best wall seconds per case, best peak FLOP/s)."""
    from glmv_jax.train.metrics import measure_peak_flops
    best, peak = {name: float("inf") for name in cases}, 0.0
    for _ in range(repeats):
        for name, run in cases.items():
            best[name] = min(best[name], timed(run)[1])
        peak = max(peak, measure_peak_flops(peak_n, repeats=2, dtype=peak_dtype))
    return best, peak


def build_runner(config: ModelConfig, batch: dict):
    """(run one step, first-step loss) with the model's own random init on the default device."""
    import jax
    from glmv_jax.models.glmv import init_params
    return jax_runner(config, jax.device_put(init_params(config, 0)), batch)


def cpu_mfu_section(repeats: int) -> str:
    import numpy as np
    base = small_config()
    batch, seq = rows(base, **CPU_ROWS)
    flops = 3.0 * forward_flops(base, CPU_ROWS["batch"], seq, [CPU_ROWS["grid"]])
    cases, losses = {}, {}
    for scan in (True, False):
        name = "scanned layers" if scan else "unrolled layers"
        cases[name], losses[name] = build_runner(replace(base, scan_layers=scan), batch)
    times, peak = interleaved_mfu(cases, repeats, 2048, np.float32)
    tokens = CPU_ROWS["batch"] * seq
    lines = [f"### scale: train-step MFU on this CPU | {machine_line()}", "",
             f"`{uptime()}` (after). Config: train_step.py's small ({millions(count_params(base))} params, "
             f"{base.text.num_hidden_layers} decoder layers), batch {CPU_ROWS['batch']} x {seq} tokens (one "
             f"{CPU_ROWS['grid'][1] * 14}px image + {CPU_ROWS['text']} text per row), fp32; {repeats} interleaved "
             f"rounds of each step and a 2048^3 matmul (best kept). Model FLOPs = 3x analytic forward = "
             f"{flops / 1e9:.1f} GFLOP/step.", "",
             "| layers | step s | tokens/s | GFLOP/s | same-run matmul peak GFLOP/s | MFU | first-step loss |",
             "|---|---|---|---|---|---|---|"]
    for name, wall in times.items():
        lines.append(f"| {name} | {wall:.3f} | {tokens / wall:,.0f} | {flops / wall / 1e9:.1f} | {peak / 1e9:.1f} | "
                     f"{flops / wall / peak:.0%} | {losses[name]:.4f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- GPU (bf16)

def dense_1b() -> ModelConfig:
    """~1.1B dense GLM-4.1V-shaped config: 12-block 1024-wide ViT, 16-layer 2048-wide decoder (GQA 16/4,
    head dim 128, interleaved M-RoPE on half the head as in GLM-4.1V), 32k vocabulary."""
    return glmv_config(dict(depth=12, hidden_size=1024, num_heads=16, out_hidden_size=2048, intermediate_size=5632,
                            patch_size=14, image_size=448),
                       dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                            num_attention_heads=16, num_key_value_heads=4, partial_rotary_factor=0.5))


def gpu_cases(small: bool) -> dict:
    """name -> (config, rows per batch, text tokens per row, image grid); --small: CPU-sized shapes."""
    if small:
        return {"dense (small stand-in for ~1B)": (small_config(), 2, 62, (1, 8, 8)),
                "tiny MoE": (tiny(moe=True), 2, 62, (1, 8, 8))}
    return {"dense ~1B": (dense_1b(), 4, 1790, (1, 32, 32)),           # 2048 tokens per row
            "tiny MoE": (tiny(moe=True), 16, 494, (1, 8, 8))}          # 512 tokens per row


def datasheet_peak(device_kind: str) -> float | None:
    return next((flops for key, flops in DATASHEET_BF16 if key in device_kind), None)


def gpu_section(small: bool, repeats: int) -> str:
    import jax
    import jax.numpy as jnp
    device = jax.devices()[0]
    sheet = datasheet_peak(device.device_kind) if device.platform != "cpu" else None
    rows_out, runners, meta = {}, {}, {}
    for name, (config, batch_rows, text, grid) in gpu_cases(small).items():
        config = replace(config, dtype="bfloat16", param_dtype="float32", attention="auto").validate()
        batch, seq = rows(config, batch_rows, text, grid)
        try:
            run, loss = build_runner(config, batch)
        except Exception as err:  # noqa: BLE001 (an OOM or an unsupported kernel is a result to report)
            rows_out[name] = (f"| {name} | {millions(count_params(config))} | {batch_rows} x {seq} | failed: "
                              f"{type(err).__name__}: {str(err).splitlines()[0][:120]} | | | | | |")
            continue
        runners[name] = run
        meta[name] = (config, batch_rows, seq, grid, loss)
    times, peak = interleaved_mfu(runners, repeats, 2048 if small or device.platform == "cpu" else 8192,
                                  jnp.bfloat16)
    for name, wall in times.items():
        config, batch_rows, seq, grid, loss = meta[name]
        flops = 3.0 * forward_flops(config, batch_rows, seq, [grid])
        vs_sheet = f"{flops / wall / sheet:.1%}" if sheet else "-"
        rows_out[name] = (f"| {name} | {millions(count_params(config))} | {batch_rows} x {seq} | {wall * 1e3:.1f} | "
                          f"{batch_rows * seq / wall:,.0f} | {flops / wall / 1e12:.3g} | {vs_sheet} | "
                          f"{flops / wall / peak:.1%} | {loss:.4f} |")
    note = f"data-sheet dense bf16 peak {sheet / 1e12:.0f} TFLOP/s" if sheet else "no data-sheet peak for this device"
    lines = [f"### scale: bf16 train-step MFU{' (--small: shrunk shapes)' if small else ''} | {machine_line()}", "",
             f"`{uptime()}` (after). bf16 compute, fp32 master weights and AdamW, attention 'auto' (cuDNN flash "
             f"attention on GPU), scanned layers, no remat; model FLOPs = 3x analytic forward; {note}; same-run "
             f"bf16 matmul peak {peak / 1e12:.2f} TFLOP/s; {repeats} interleaved rounds (best kept).", "",
             "| case | params | rows x tokens | step ms | tokens/s | TFLOP/s | MFU (data sheet) | "
             "MFU (same-run matmul) | first-step loss |", "|---|---|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [rows_out[name] for name in gpu_cases(small) if name in rows_out]) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="compile,mfu", help="comma-separated: compile, mfu (CPU mode)")
    parser.add_argument("--layers", default="2,4,8,16", help="decoder depths for the compile-time sweep")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="bf16 MFU of a ~1B dense config and the tiny MoE")
    parser.add_argument("--small", action="store_true", help="with --gpu: shrunk shapes (runs on CPU)")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    if args.small and not args.gpu:
        raise SystemExit("--small only applies to --gpu")
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - {"compile", "mfu"})
    if unknown:
        raise SystemExit(f"unknown --parts {unknown}; expected some of ['compile', 'mfu']")
    layers = [int(n) for n in args.layers.split(",") if n]
    if not layers or min(layers) < 1:
        raise SystemExit(f"--layers must be positive integers, got {args.layers!r}")

    if args.gpu:
        sections = [gpu_section(args.small, args.repeats)]
    else:
        sections = ([compile_section(layers)] if "compile" in parts else []) + \
                   ([cpu_mfu_section(args.repeats)] if "mfu" in parts else [])
    text = "\n".join(sections)
    print(text)
    if not args.no_append:
        append_results(text)


if __name__ == "__main__":
    main()
