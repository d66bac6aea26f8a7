"""One GLM-4.5-Air-style MoE layer, forward + backward: dropless grouped (tiled GMM) vs the dense
all-experts einsum vs HF transformers' PyTorch Glm4vMoeTextMoE (its default grouped_mm experts backend;
--hf-eager adds the per-expert loop), on the same config and inputs. JAX steps are compiled ahead of time
and each path gets one warm-up step, then the best of --iters timed steps (1 by default: ~3 minutes on 2 idle cores).

    python -m benchmarks.moe [--tokens 2048 --experts 64 --topk 8 --width 1024 --moe-width 512]

Prints a table (step time, tokens/s, model FLOP/s as a fraction of a large-matmul peak measured in the
same run per framework) and appends it to benchmarks/RESULTS.md. Model FLOPs count the useful work only:
router + K routed experts + shared expert per token, x3 for forward + backward. The dense einsum runs
E/K times that work, so its fraction of peak shows the waste. jax.lax.ragged_dot is left out on CPU: XLA:CPU
lowers it to a dense masked product costing E times the work and E*rows*D memory (moe_gmm.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import uptime  # noqa: E402
from glmv_jax.config import tiny  # noqa: E402
from glmv_jax.models import moe  # noqa: E402


def best_time(fn, iters: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def jax_peak(n=2048) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    return 2 * n ** 3 / best_time(lambda: mm(a).block_until_ready(), 3)


def torch_peak(n=2048) -> float:
    import torch
    a = torch.randn(n, n)
    return 2 * n ** 3 / best_time(lambda: a @ a, 3)


def model_flops(cfg, tokens: int) -> float:
    d, f, e, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    forward = 2 * tokens * (d * e + 3 * d * f * k + 3 * d * f * cfg.n_shared_experts)
    return 3 * forward


def layer_inputs(cfg, tokens: int, seed: int = 0):
    """(one layer's fp32 params at unit output scale, x [tokens, D], cotangent [tokens, D]), seeded."""
    rng = np.random.default_rng(seed)
    d, e, f = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    n = lambda *s, fan: jnp.asarray(rng.standard_normal(s, np.float32) / np.sqrt(fan))
    params = {"router": {"kernel": n(d, e, fan=d), "correction_bias": n(e, fan=100)},
              "experts": {"gate": n(e, d, f, fan=d), "up": n(e, d, f, fan=d), "down": n(e, f, d, fan=f)},
              "shared": {"gate": {"kernel": n(d, f, fan=d)}, "up": {"kernel": n(d, f, fan=d)},
                         "down": {"kernel": n(f, d, fan=f)}}}
    return params, n(tokens, d, fan=1), n(tokens, d, fan=1)


def jax_step(cfg, params, x, cot, options):
    def loss(p, x):
        return jnp.vdot(moe.moe_layer(p, x, cfg, options=options)[0], cot)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()     # compile time kept out of the timing
    return lambda: jax.block_until_ready(grad(params, x))


def hf_step(cfg, params, x, cot, impl: str):
    import torch
    from transformers.models.glm4v_moe.configuration_glm4v_moe import Glm4vMoeTextConfig
    from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeTextMoE
    from glmv_jax.config import to_hf_config
    hf_cfg = Glm4vMoeTextConfig(**to_hf_config(tiny(moe=True).replace(text=cfg))["text_config"])
    hf_cfg._experts_implementation = impl
    block = Glm4vMoeTextMoE(hf_cfg)
    t = lambda a: torch.from_numpy(np.array(a, np.float32))
    ex, sh = params["experts"], params["shared"]
    with torch.no_grad():
        block.gate.weight.copy_(t(params["router"]["kernel"]).T)
        block.gate.e_score_correction_bias.copy_(t(params["router"]["correction_bias"]))
        block.experts.gate_up_proj.copy_(t(np.concatenate([ex["gate"], ex["up"]], axis=2).transpose(0, 2, 1)))
        block.experts.down_proj.copy_(t(np.asarray(ex["down"]).transpose(0, 2, 1)))
        for name in ("gate", "up", "down"):
            getattr(block.shared_experts, f"{name}_proj").weight.copy_(t(sh[name]["kernel"]).T)
    xt, ct = t(x).requires_grad_(True), t(cot)

    def step():
        block.zero_grad(set_to_none=True)
        xt.grad = None
        (block(xt) * ct).sum().backward()
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--moe-width", type=int, default=512)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--hf-eager", action="store_true", help="also time HF's eager per-expert loop (slow)")
    ap.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = replace(tiny(moe=True).text, hidden_size=args.width, moe_intermediate_size=args.moe_width,
                  n_routed_experts=args.experts, num_experts_per_tok=args.topk, n_group=1, topk_group=1)
    d, e, f = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    params, x, cot = layer_inputs(cfg, args.tokens)

    load_before = uptime()
    peaks = {"jax": jax_peak(), "torch": torch_peak()}
    flops = model_flops(cfg, args.tokens)
    runs = [("HF PyTorch (grouped_mm, HF's default)", "torch", hf_step(cfg, params, x, cot, "grouped_mm")),
            ("jax dropless grouped (tiled GMM)", "jax",
             jax_step(cfg, params, x, cot, moe.MoEOptions(gmm="tiled", tile=args.tile)))]
    if not args.skip_dense:
        runs.append(("jax dense all-experts einsum", "jax", jax_step(cfg, params, x, cot, moe.MoEOptions(dispatch="dense"))))
    if args.hf_eager:
        runs.append(("HF PyTorch (eager expert loop)", "torch", hf_step(cfg, params, x, cot, "eager")))

    rows = []
    for name, fw, step in runs:
        try:
            sec = best_time(step, args.iters)
        except Exception as err:                                   # an HF backend missing on this torch
            rows.append((name, None, f"failed: {type(err).__name__}: {str(err)[:80]}"))
            continue
        rows.append((name, sec, fw))
    hf = rows[0][1]
    header = (f"| path | fwd+bwd ms | tokens/s | model GFLOP/s | % of {'/'.join(f'{k} {v / 1e9:.0f}' for k, v in peaks.items())}"
              f" GFLOP/s peak | speed vs HF grouped_mm |")
    lines = [header, "|---|---|---|---|---|---|"]
    for name, sec, fw in rows:
        if sec is None:
            lines.append(f"| {name} | {fw} | | | | |")
            continue
        vs_hf = f"{hf / sec:.2f}x" if hf else "n/a"
        lines.append(f"| {name} | {sec * 1e3:.0f} | {args.tokens / sec:,.0f} | {flops / sec / 1e9:.1f} | "
                     f"{100 * flops / sec / peaks[fw]:.1f}% | {vs_hf} |")
    setup = (f"{args.tokens} tokens, E={e}, top-{cfg.num_experts_per_tok}, D={d}, F={f}, shared 1x{f}, fp32, "
             f"tile {args.tile}; model FLOPs fwd+bwd {flops / 1e9:.1f} G")
    machine = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, jax {jax.__version__} " \
              f"({jax.default_backend()}), torch {torch.__version__}"
    secs = {name: sec for name, sec, _ in rows}
    dropless, dense = secs.get("jax dropless grouped (tiled GMM)"), secs.get("jax dense all-experts einsum")
    if dropless and dense:
        lines.append(f"\ndropless grouped vs dense all-experts einsum (same run): **{dense / dropless:.2f}x**")
    table = "\n".join(lines)
    machine += f"\nload: {load_before} (before) / {uptime()} (after)"
    print(setup, machine, table, sep="\n")
    if not args.no_results:
        path = Path(__file__).with_name("RESULTS.md")
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with path.open("a") as fh:
            if path.stat().st_size == 0:
                fh.write("# Benchmark results\n")
            fh.write(f"\n## MoE layer fwd+bwd (benchmarks/moe.py), {date}\n{machine}\n\n{setup}\n\n{table}\n")


if __name__ == "__main__":
    main()
