"""Rollout throughput on length-skewed rows: generate's one decode loop (all rows step until the last ends) vs
compaction (compact_every=S: finished rows dropped every S steps once at least half are).

Workload: the small config of benchmarks/generate.py (~8M parameters, vocabulary 8000) with random weights,
P prompts (one 8x8-patch image + text) x G samples, sampling at temperature 1, N new tokens. Half the rows
(alternate rows of every group) end at about 16 tokens, the others run to N: a first generation without stop
ids gives every row's tokens, then each short row gets a stop id it emits from position `--short-at` on and
no long row ever emits (tests.helpers.skewed_stop_ids); with the same rng the rows redo exactly those draws.
Tokens/s = tokens emitted (sum of lengths) / wall time of generate (prefill included), best of --repeats
interleaved calls after a warm-up (compiles excluded). "row-steps" counts decode steps times batch rows as
compaction schedules them (the one loop: B x N): one loop's row-steps / compaction's is the speed-up when a
step costs in proportion to its rows. Appends to RESULTS.md with the machine's load.

    python -m benchmarks.rollout_skew [--prompts 4] [--samples 8] [--new-tokens 256] [--every 16 32 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_results, interleaved, machine_line, uptime  # noqa: E402
from benchmarks.generate import make_rows, prompt_dict, small_config  # noqa: E402
from glmv_jax.generate import sampler  # noqa: E402
from tests.helpers import random_params, skewed_stop_ids  # noqa: E402


def row_steps(lengths: np.ndarray, n: int, every: int) -> int:
    """Decode steps x batch rows of generate(..., compact_every=every) for rows of these lengths (0: one loop)."""
    if not every:
        return len(lengths) * int(lengths.max())
    rows, total = lengths, 0
    for until in range(every, n + every, every):
        steps = min(until, n, int(rows.max())) - (until - every)
        total += len(rows) * max(steps, 0)
        done = rows <= until
        if until >= n or done.all():
            break
        slots = sampler.compacted_slots(done)
        if slots is not None:
            rows = np.where(np.arange(len(slots)) < (~done).sum(), rows[slots], 0)
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--short-at", type=int, default=15)
    parser.add_argument("--every", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()

    load_start = uptime()
    config = small_config()
    params = jax.device_put(random_params(config, seed=0, std=0.05))
    prompts = [prompt_dict(config, r) for r in make_rows(config, args.prompts, 32)]
    n = args.new_tokens
    kw = dict(num_samples=args.samples, max_new_tokens=n, temperature=1.0, rng=jax.random.key(0))
    free = sampler.generate(config, params, prompts, **kw)
    short = np.arange(len(free["lengths"])) % 2 == 0
    kw["stop_ids"] = skewed_stop_ids(free["tokens"], short, args.short_at)
    run = {"one loop": lambda: sampler.generate(config, params, prompts, **kw)}
    run.update({f"compact_every={s}": (lambda s=s: sampler.generate(config, params, prompts, compact_every=s, **kw))
                for s in args.every})
    outs = {name: fn() for name, fn in run.items()}                      # warm-up: compiles
    ref = outs["one loop"]
    same = all(all(np.array_equal(o[k], ref[k]) for k in ("tokens", "logprobs", "lengths", "finished"))
               for o in outs.values())
    best = interleaved(run, args.repeats)
    load_end = uptime()

    lengths, emitted = ref["lengths"], int(ref["lengths"].sum())
    base_steps, base_time = row_steps(lengths, n, 0), best["one loop"][0]
    lines = [f"## rollout on length-skewed rows (benchmarks/rollout_skew.py), {machine_line()}",
             f"`uptime` at start: {load_start}; at end: {load_end} (shared machine: another benchmark ran beside it)",
             "", f"small config (~8M, random weights std 0.05), {args.prompts} prompts x {args.samples} samples = "
             f"{len(lengths)} rows, temperature 1, {n} new tokens; short rows' lengths {int(lengths[short].min())}-"
             f"{int(lengths[short].max())} (mean {lengths[short].mean():.1f}), long rows {int(lengths[~short].min())}; "
             f"{emitted} tokens emitted; outputs identical to the one loop: {same}; best of {args.repeats}", "",
             "| path | wall (s) | tokens/s | speed-up | row-steps | row-step bound |", "|---|---|---|---|---|---|"]
    for name, (wall, _) in best.items():
        every = 0 if name == "one loop" else int(name.split("=")[1])
        steps = row_steps(lengths, n, every)
        lines.append(f"| {name} | {wall:.2f} | {emitted / wall:,.0f} | {base_time / wall:.2f}x | {steps:,} | "
                     f"{base_steps / steps:.2f}x |")
    text = "\n".join(lines + [""]) + "\n"
    print(text)
    if not args.no_append:
        append_results(text)


if __name__ == "__main__":
    main()
