"""Accelerator benchmark (issue 17, item 5): one script for a GPU machine, tested on CPU with --tiny.

Three sections, each against the card's data-sheet figures (CARDS, looked up by jax's device_kind) and
against a same-run measurement (a large bf16 matmul; a bf16 reduction over a large buffer):
  train   the ~1B dense GLM-V-shaped config (one_b_config) in bf16 compute with fp32 master weights, the
          runner's train step (train_step.jax_runner: loss, grad, clip, AdamW), attention "cudnn"
          (jax.nn.dot_product_attention(implementation="cudnn")) where attention.cudnn_problems allows it,
          else "einsum". MFU = 3 x analytic forward FLOPs (models/flops.py) / step time / peak.
  decode  the sampler's KV-cache loop (greedy, no stop ids) on the same model and weights: decode steps/s
          = (N - 1) / (generate - prefill). Bytes a step reads = decode-layout weights (kv_cache.decode_weights)
          + the whole KV cache (every slot is read under the mask); fraction of HBM = bytes x steps/s / bandwidth.
  moe     one GLM-4.5-Air-shaped MoE layer, forward + backward in bf16: dropless through jax.lax.ragged_dot,
          through the tiled grouped matmul, the dense all-experts einsum, and expert parallelism over every
          device with jax.lax.ragged_all_to_all (moe_parallel "ragged_a2a", native collective).
What cannot run on this backend is listed under "skipped" with the reason (on XLA:CPU: cuDNN attention,
the native ragged_all_to_all, the data-sheet peak); the rest runs. --tiny shrinks every size (tiny() model,
a small MoE layer) so the whole script runs in a minute on CPU; its figures mean nothing.

    python -m benchmarks.accelerator [--tiny] [--batch 4] [--text-tokens 1792] [--new-tokens 64]
                                     [--repeats 3] [--json out.json] [--no-results]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_results, glmv_config, machine_line, uptime  # noqa: E402
from glmv_jax.config import ModelConfig, tiny  # noqa: E402

# device_kind key -> (name, bf16 dense tensor TFLOP/s without sparsity, HBM GB/s), from the data sheets.
# A key matches as whole words of device_kind (so "A10" is not "A10G", "L4" not "L40S"); first match wins.
CARDS = (
    ("H200 NVL", ("H200 NVL", 835.0, 4800.0)),
    ("H200", ("H200 SXM", 989.0, 4800.0)),
    ("H100 PCIe", ("H100 PCIe", 756.0, 2000.0)),
    ("H100 NVL", ("H100 NVL", 835.0, 3900.0)),
    ("H100", ("H100 SXM", 989.0, 3350.0)),
    ("A100-SXM4-80GB", ("A100 SXM 80GB", 312.0, 2039.0)),
    ("A100 80GB PCIe", ("A100 PCIe 80GB", 312.0, 1935.0)),
    ("A100", ("A100 40GB", 312.0, 1555.0)),
    ("L40S", ("L40S", 362.0, 864.0)),
    ("L4", ("L4", 121.0, 300.0)),
    ("A10", ("A10", 125.0, 600.0)),
)


def card_spec(device_kind: str) -> dict | None:
    """The data-sheet row of a device_kind (e.g. "NVIDIA H100 80GB HBM3"), or None for an unknown card."""
    for key, (name, tflops, gbps) in CARDS:
        if re.search(rf"(^|[\s-]){re.escape(key)}($|[\s-])", device_kind, re.IGNORECASE):
            return dict(name=name, bf16_flops=tflops * 1e12, hbm_bytes_s=gbps * 1e9)
    return None


def one_b_config() -> ModelConfig:
    """~1.3B parameters, GLM-4.1V-shaped: ~1.0B dense decoder (18 layers, D 2048, GQA 16/2 heads of 128,
    half-rotary interleaved M-RoPE 8/12/12), 64k vocabulary, an 8-block ViT."""
    return glmv_config(dict(depth=8, hidden_size=1024, num_heads=8, out_hidden_size=2048, intermediate_size=6912,
                            patch_size=14, image_size=448),
                       dict(vocab_size=65536, hidden_size=2048, intermediate_size=6912, num_hidden_layers=18,
                            num_attention_heads=16, num_key_value_heads=2, partial_rotary_factor=0.5))


def sizes(tiny_run: bool, args) -> dict:
    """Every size the sections use: --tiny for CPU tests, else the accelerator run."""
    if tiny_run:
        return dict(config=tiny(), grid=(1, 4, 4), batch=2, text=12, new=6, mm=256, bw_mib=16,
                    moe=dict(tokens=64, experts=8, topk=2, width=64, moe_width=32, tile=16))
    return dict(config=one_b_config(), grid=(1, 32, 32), batch=args.batch, text=args.text_tokens, new=args.new_tokens,
                mm=8192, bw_mib=2048, moe=dict(tokens=16384, experts=128, topk=8, width=4096, moe_width=1408, tile=128))


def best_of(fn, repeats: int) -> float:
    """Best wall seconds of `repeats` calls of fn (which blocks until its work is done)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measured_peaks(n: int, mib: int, repeats: int) -> dict:
    """Same-run yardsticks: bf16 n^3 matmul FLOP/s and the read rate of a jitted bf16 sum over `mib` MiB."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    flops = 2.0 * n ** 3 / best_of(lambda: mm(a).block_until_ready(), repeats)
    buf = jnp.ones((mib * 2 ** 19,), jnp.bfloat16)
    total = jax.jit(lambda b: jnp.sum(b, dtype=jnp.float32))
    total(buf).block_until_ready()
    return dict(matmul_flops=flops, read_bytes_s=buf.nbytes / best_of(lambda: total(buf).block_until_ready(), repeats))


def attention_choice(config: ModelConfig, seq: int, skipped: list) -> str:
    """"cudnn" when attention.cudnn_problems finds nothing for this config's q/k, else "einsum" (recorded)."""
    import jax
    import jax.numpy as jnp
    from glmv_jax.models import attention
    t = config.text
    q = jax.ShapeDtypeStruct((1, seq, t.num_attention_heads, t.dim_per_head), jnp.dtype(config.dtype))
    k = jax.ShapeDtypeStruct((1, seq, t.num_key_value_heads, t.dim_per_head), jnp.dtype(config.dtype))
    problems = attention.cudnn_problems(q, k)
    if problems:
        skipped.append(dict(what="cuDNN attention (jax.nn.dot_product_attention implementation='cudnn')",
                            why="; ".join(problems) + "; the train step ran attention='einsum'"))
        return "einsum"
    return "cudnn"


# ----------------------------------------------------------------------------------------------- sections

def train_section(config: ModelConfig, params, sz: dict, repeats: int, peaks: dict, card) -> dict:
    """One train step of the runner on a batch of image + text rows -> timing, FLOPs and MFU."""
    from benchmarks.train_step import jax_batch, jax_runner, make_inputs
    from glmv_jax.models.flops import forward_flops
    inputs = make_inputs(config, sz["batch"], sz["text"], grid=sz["grid"])
    batch = jax_batch(config, inputs)
    start = time.perf_counter()
    run, loss = jax_runner(config, params, batch)
    compile_s = time.perf_counter() - start
    sec = best_of(run, repeats)
    seq = batch["input_ids"].shape[1]
    flops = 3.0 * forward_flops(config, sz["batch"], seq, [sz["grid"]])
    return dict(attention=config.attention, batch=sz["batch"], seq=seq, step_s=sec, tokens_s=sz["batch"] * seq / sec,
                model_flops=flops, flops_s=flops / sec, mfu_measured=flops / sec / peaks["matmul_flops"],
                mfu_card=None if card is None else flops / sec / card["bf16_flops"], first_loss=loss,
                compile_s=compile_s)


def decode_bytes(config: ModelConfig, params, rows: int, cache_len: int) -> dict:
    """Bytes one decode step reads: the decode-layout weights and the KV cache (all layers, all slots)."""
    import jax
    import jax.numpy as jnp
    from glmv_jax.generate import kv_cache
    shapes = jax.eval_shape(lambda p: kv_cache.decode_weights(config, p), params)
    weights = sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(shapes))
    t = config.text
    cache = 2 * t.num_hidden_layers * rows * t.num_key_value_heads * cache_len * t.dim_per_head
    return dict(weights=weights, kv_cache=cache * jnp.dtype(config.dtype).itemsize)


def decode_section(config: ModelConfig, params, sz: dict, repeats: int, peaks: dict, card) -> dict:
    """The sampler's decode loop: steps/s from generate minus prefill, and its fraction of HBM bandwidth."""
    import jax
    from benchmarks.generate import make_rows, prompt_dict
    from glmv_jax.generate import kv_cache, sampler
    from glmv_jax.generate.prompts import batch_prompts
    n = sz["new"]
    prompts = [prompt_dict(config, row) for row in make_rows(config, sz["batch"], sz["text"])]
    batch = batch_prompts(prompts)
    tp = batch["input_ids"].shape[1]
    prefill = jax.jit(lambda p, b: kv_cache.prefill(config, p, b, tp + n)[0])

    def generate():
        return sampler.generate(config, params, prompts, max_new_tokens=n, temperature=0.0, stop_ids=())

    tokens = generate()["tokens"]
    prefill(params, batch).block_until_ready()
    total = best_of(generate, repeats)
    first = best_of(lambda: prefill(params, batch).block_until_ready(), repeats)
    rows = batch["input_ids"].shape[0]
    steps_s = (n - 1) / max(total - first, 1e-9)
    read = decode_bytes(config, params, rows, tp + n)
    per_step = read["weights"] + read["kv_cache"]
    return dict(rows=rows, prompt=tp, new_tokens=n, generate_s=total, prefill_s=first, steps_s=steps_s,
                decode_tokens_s=rows * steps_s, bytes_per_step=per_step, weight_bytes=read["weights"],
                kv_bytes=read["kv_cache"], of_measured_bw=per_step * steps_s / peaks["read_bytes_s"],
                of_hbm=None if card is None else per_step * steps_s / card["hbm_bytes_s"],
                emitted=int(tokens.shape[1]))


def moe_section(sz: dict, repeats: int, peaks: dict, card, skipped: list) -> dict:
    """One MoE layer fwd+bwd in bf16 per dispatch path -> step time and model FLOP/s (useful work only)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType
    from benchmarks.moe import jax_step, layer_inputs, model_flops
    from glmv_jax.models.moe import MoEOptions
    from glmv_jax.models.moe_parallel import ExpertParallel
    m = sz["moe"]
    cfg = replace(tiny(moe=True).text, hidden_size=m["width"], moe_intermediate_size=m["moe_width"],
                  n_routed_experts=m["experts"], num_experts_per_tok=m["topk"], n_group=1, topk_group=1)
    params, x, cot = layer_inputs(cfg, m["tokens"])
    x, cot = x.astype(jnp.bfloat16), cot.astype(jnp.bfloat16)
    paths = {"dropless ragged_dot": MoEOptions(gmm="ragged_dot"),
             "dropless tiled grouped matmul": MoEOptions(gmm="tiled", tile=m["tile"]),
             "dense all-experts einsum": MoEOptions(dispatch="dense")}
    devices = jax.device_count()
    if jax.default_backend() == "cpu":
        skipped.append(dict(what="MoE expert parallelism with jax.lax.ragged_all_to_all",
                            why="XLA:CPU has no ragged-all-to-all (HLO opcode not supported by the CPU emitter)"))
    elif m["experts"] % devices or m["tokens"] % devices:
        skipped.append(dict(what="MoE expert parallelism with jax.lax.ragged_all_to_all",
                            why=f"{m['experts']} experts / {m['tokens']} tokens do not split over {devices} devices"))
    else:
        mesh = jax.make_mesh((devices,), ("expert",), axis_types=(AxisType.Auto,))
        ep = ExpertParallel(mesh, token_axes=("expert",), strategy="ragged_a2a", ragged_collective="native")
        paths[f"expert-parallel ragged_all_to_all over {devices} device(s)"] = MoEOptions(parallel=ep, tile=m["tile"])
    flops = model_flops(cfg, m["tokens"])
    rows = []
    for name, options in paths.items():
        try:
            step = jax_step(cfg, params, x, cot, options)
            step()
            sec = best_of(step, repeats)
        except Exception as err:  # noqa: BLE001 (a backend without the op: reported, the other paths still run)
            rows.append(dict(path=name, status=f"failed: {type(err).__name__}: {str(err)[:160]}"))
            continue
        rows.append(dict(path=name, status="ok", step_s=sec, tokens_s=m["tokens"] / sec, flops_s=flops / sec,
                         of_measured=flops / sec / peaks["matmul_flops"],
                         of_card=None if card is None else flops / sec / card["bf16_flops"]))
    dense = next((r for r in rows if r["path"].startswith("dense") and r["status"] == "ok"), None)
    for r in rows:
        if dense is not None and r["status"] == "ok":
            r["vs_dense"] = dense["step_s"] / r["step_s"]
    return dict(layer=dict(m, shared=1, dtype="bfloat16"), model_flops=flops, rows=rows)


# ----------------------------------------------------------------------------------------------- report

def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def report(out: dict) -> str:
    """The RESULTS.md section of one run."""
    card, pk, tr, de, mo = out["card"], out["peaks"], out["train"], out["decode"], out["moe"]
    card_line = ("no data-sheet row for this device (CARDS)" if card is None else
                 f"data sheet {card['name']}: bf16 dense {card['bf16_flops'] / 1e12:.0f} TFLOP/s, "
                 f"HBM {card['hbm_bytes_s'] / 1e9:.0f} GB/s")
    lines = [f"## accelerator benchmark (benchmarks/accelerator.py{' --tiny' if out['tiny'] else ''}), {out['machine']}",
             f"load: {out['load']}", "",
             f"{out['params'] / 1e6:,.1f}M params; {card_line}; same run: bf16 matmul "
             f"{pk['matmul_flops'] / 1e12:.3f} TFLOP/s, bf16 read {pk['read_bytes_s'] / 1e9:.1f} GB/s", "",
             "| section | figure | value | of same-run peak | of data sheet |", "|---|---|---|---|---|",
             f"| train step ({tr['batch']} x {tr['seq']} tok, bf16, attention {tr['attention']}) | s/step, tokens/s | "
             f"{tr['step_s']:.4f}, {tr['tokens_s']:,.0f} | MFU {_pct(tr['mfu_measured'])} | MFU {_pct(tr['mfu_card'])} |",
             f"| decode loop ({de['rows']} rows, {de['new_tokens']} new) | steps/s, tokens/s, MB read/step | "
             f"{de['steps_s']:.1f}, {de['decode_tokens_s']:,.0f}, {de['bytes_per_step'] / 1e6:.1f} | "
             f"{_pct(de['of_measured_bw'])} of bandwidth | {_pct(de['of_hbm'])} of HBM |"]
    for r in mo["rows"]:
        if r["status"] != "ok":
            lines.append(f"| MoE layer fwd+bwd: {r['path']} | {r['status']} | | | |")
            continue
        vs = f", {r['vs_dense']:.2f}x dense" if "vs_dense" in r else ""
        lines.append(f"| MoE layer fwd+bwd: {r['path']} | s/step, tokens/s | {r['step_s']:.4f}, {r['tokens_s']:,.0f}{vs} | "
                     f"{_pct(r['of_measured'])} | {_pct(r['of_card'])} |")
    lay = mo["layer"]
    lines += ["", f"MoE layer: {lay['tokens']} tokens, E={lay['experts']}, top-{lay['topk']}, D={lay['width']}, "
              f"F={lay['moe_width']}, 1 shared expert, bf16; model FLOPs (router + K experts + shared, x3) "
              f"{mo['model_flops'] / 1e9:.4g} G."]
    lines += [f"- skipped: {s['what']}: {s['why']}" for s in out["skipped"]]
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    """Every section on the default backend -> the result dict (report() renders it)."""
    import jax
    from glmv_jax.models.glmv import init_params
    sz = sizes(args.tiny, args)
    device = jax.devices()[0]
    card = card_spec(device.device_kind) if device.platform != "cpu" else None
    skipped = [] if card is not None else [dict(what="MFU / HBM fraction against a data sheet",
                                                why=f"no CARDS row for device_kind {device.device_kind!r}")]
    load = uptime()
    peaks = measured_peaks(sz["mm"], sz["bw_mib"], args.repeats)
    config = sz["config"].replace(dtype="bfloat16")
    seq = sz["text"] + int(np.prod(sz["grid"])) // config.vision.spatial_merge_size ** 2 + 2
    config = config.replace(attention=attention_choice(config, seq, skipped))
    params = jax.device_put(init_params(config, jax.random.key(0)))
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    out = dict(tiny=bool(args.tiny), machine=machine_line(), device_kind=device.device_kind, card=card,
               params=n_params, peaks=peaks, skipped=skipped)
    out["decode"] = decode_section(config, params, sz, args.repeats, peaks, card)
    out["train"] = train_section(config, params, sz, args.repeats, peaks, card)     # donates params: last user
    out["moe"] = moe_section(sz, args.repeats, peaks, card, skipped)
    out["load"] = f"{load} (before) / {uptime()} (after)"
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes (CPU tests); the figures mean nothing")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text-tokens", type=int, default=1792, help="text tokens per row (plus 256 image tokens)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the result dict here")
    ap.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = run(args)
    text = report(out)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    if not args.no_results:
        append_results(text)
    return out


if __name__ == "__main__":
    main()
