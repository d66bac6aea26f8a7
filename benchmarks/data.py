"""Data-pipeline throughput and packing efficiency on the built-in task suite (all 7 domains).

Throughput: the image pipeline of `make_pipeline` (records with their Pillow images -> image processor ->
chat template + tokens -> M-RoPE positions -> first-fit packing into BATCH.md batches) with 0 and 2 worker
processes (`DataConfig.num_workers`), after a warm-up, over a fixed number of batches: samples/s and packed
real (non-padding) tokens/s and patch rows/s. Two settings: the demo's (64 px images, patch 8, T=256, B=8,
Np=1536) and larger images (224 px, patch 14, T=512, B=8, Np=8192). Tokenizer, model config and processor
are built as `train.experiment.setup` builds them for the synthetic suite (pixel budget 2 * side^2, i.e.
native size). Record rendering (synthetic generation) is timed separately, outside the pipeline.

Packing efficiency: token efficiency (real tokens / B*T) and patch efficiency (real patch rows / Np) from the
pipeline's `stats()`, for caption and sft records, at a few (T, Np) settings.

    python -m benchmarks.data [--quick] [--no-append]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).with_name("RESULTS.md")


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    image_size: int          # synthetic image side (px)
    patch_size: int          # vision patch side (px); merge 2, temporal patch 2
    seq_len: int             # T
    patch_budget: int        # Np
    batch_size: int = 8      # B


DEMO = Setting("demo 64px p8", 64, 8, 256, 1536)
LARGE = Setting("224px p14", 224, 14, 512, 8192)
# (T, Np) grid for packing efficiency, on the demo's processor (64 px, patch 8: 64 patch rows per image)
# (demo: patch-bound; T256 Np2560: about balanced for sft; T512 Np6144: token-bound for sft, not for caption)
PACKING = [DEMO, Setting("demo T256 Np2560", 64, 8, 256, 2560), Setting("demo T512 Np6144", 64, 8, 512, 6144), LARGE]


def stage_config(setting: Setting, kind: str):
    """The demo's SFT stage config with this setting's image / patch / packing sizes."""
    from experiments.configs.demo import get_config
    cfg = get_config().stages[1]
    cfg.model.vision.update(patch_size=setting.patch_size, image_size=setting.image_size)
    cfg.data.update(image_size=setting.image_size, seq_len=setting.seq_len, patch_budget=setting.patch_budget,
                    batch_size=setting.batch_size, kind=kind)
    return cfg


@functools.lru_cache(maxsize=None)
def suite_tokenizer():
    """The run's tokenizer for the synthetic suite (train.experiment._tokenizer of the demo config)."""
    from glmv_jax.train.experiment import _tokenizer
    return _tokenizer(stage_config(DEMO, "sft"))


def build(setting: Setting, kind: str):
    """-> (stage config, tokenizer, processor) as train.experiment.setup makes them for the synthetic suite."""
    from glmv_jax.data.transforms import Processor
    from glmv_jax.train.experiment import model_config_for
    cfg = stage_config(setting, kind)
    tokenizer = suite_tokenizer()
    side = cfg.data.image_size
    processor = Processor.for_model(model_config_for(cfg, tokenizer), template=cfg.data.get("template", "glm41v"),
                                    min_pixels=2 * side * side, max_pixels=2 * side * side)
    return cfg, tokenizer, processor


def make_records(cfg, per_domain: int) -> tuple[list[dict], float]:
    """Synthetic records (images rendered with Pillow) of all domains -> (records, seconds to render)."""
    from glmv_jax.data.pipeline import data_config, synthetic_records
    start = time.perf_counter()
    records = synthetic_records(data_config(cfg.data, num_records=per_domain))
    return records, time.perf_counter() - start


def run_pipeline(cfg, tokenizer, processor, records, workers: int, warmup: int, batches: int) -> dict:
    """Start a pipeline, take `warmup` batches, then time `batches` more -> rates over the timed window."""
    from glmv_jax.data.pipeline import make_pipeline
    start = time.perf_counter()
    it = make_pipeline(cfg.data, tokenizer, processor, sources=records, num_workers=workers)
    next(it)
    first = time.perf_counter() - start
    for _ in range(warmup):
        next(it)
    before = it.stats()
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - start
    after = it.stats()
    del it
    gc.collect()                   # shuts grain's worker processes down before the next run
    delta = {k: after[k] - before[k] for k in ("samples", "tokens", "patches")}
    return {"first_batch_s": first, "seconds": seconds, "batches_per_s": batches / seconds,
            "samples_per_s": delta["samples"] / seconds, "tokens_per_s": delta["tokens"] / seconds,
            "patches_per_s": delta["patches"] / seconds, "skipped": after["skipped_total"], **after}


def load_average() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1].strip()


def throughput_table(args) -> list[str]:
    lines = [f"Throughput (kind sft, demo's SFT tier mix, {args.per_domain} records/domain rendered up front; "
             f"warm-up {args.warmup} batches, then {args.batches} timed batches; first batch includes starting the "
             "workers; rates and efficiencies are over the timed batches):", "",
             "| setting | T / B / Np | render records/s | workers | first batch (s) | batches/s | samples/s | "
             "real tokens/s | patch rows/s | token eff | patch eff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting in (DEMO, LARGE):
        cfg, tokenizer, processor = build(setting, "sft")
        records, render_s = make_records(cfg, args.per_domain)
        for workers in (0, 2):
            r = run_pipeline(cfg, tokenizer, processor, records, workers, args.warmup, args.batches)
            lines.append(f"| {setting.name} | {setting.seq_len} / {setting.batch_size} / {setting.patch_budget} | "
                         f"{len(records) / render_s:,.0f} | {workers} | {r['first_batch_s']:.2f} | "
                         f"{r['batches_per_s']:.1f} | {r['samples_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
                         f"{r['patches_per_s']:,.0f} | {r['mean_token_efficiency']:.1%} | "
                         f"{r['mean_patch_efficiency']:.1%} |")
            print(lines[-1], flush=True)
    return lines


def packing_table(args) -> list[str]:
    lines = [f"Packing efficiency (first-fit; means over {args.pack_batches} batches, 0 workers; "
             "tok/sample and rows/sample are per packed sample):", "",
             "| kind | setting | T / B / Np | samples/batch | tok/sample | rows/sample | token eff | patch eff | "
             "skipped |", "|---|---|---|---|---|---|---|---|---|"]
    for kind in ("caption", "sft"):
        for setting in PACKING:
            cfg, tokenizer, processor = build(setting, kind)
            records, _ = make_records(cfg, args.per_domain)
            r = run_pipeline(cfg, tokenizer, processor, records, 0, 0, args.pack_batches)
            lines.append(f"| {kind} | {setting.name} | {setting.seq_len} / {setting.batch_size} / "
                         f"{setting.patch_budget} | {r['samples'] / r['batches']:.1f} | "
                         f"{r['tokens'] / r['samples']:.1f} | {r['patches'] / r['samples']:.0f} | "
                         f"{r['mean_token_efficiency']:.1%} | {r['mean_patch_efficiency']:.1%} | {r['skipped_total']} |")
            print(lines[-1], flush=True)
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer batches and records (about a minute; worker start-up dominates)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per throughput run")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    args.warmup = 2 if args.quick else 5
    args.batches = args.batches or (8 if args.quick else 40)
    args.pack_batches = 8 if args.quick else 30
    args.per_domain = 40 if args.quick else 150

    import grain
    import PIL
    load_before = load_average()
    start = time.perf_counter()
    body = throughput_table(args) + [""] + packing_table(args)
    elapsed = time.perf_counter() - start
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = [f"## Data pipeline (benchmarks/data.py{' --quick' if args.quick else ''}), {stamp}",
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
              f"{load_before} (before) / {load_average()} (after); grain {grain.__version__}, Pillow "
              f"{PIL.__version__}; run took {elapsed:.0f} s", "",
              "Note: the machine is shared with other jobs running at the same time (see the load average), so "
              "absolute rates are noisy lower bounds; with 2 cores, worker processes compete with the main "
              "process (which packs) and with the other jobs.", ""]
    text = "\n".join(header + body) + "\n"
    print("\n" + text)
    if not args.no_append:
        with RESULTS.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
