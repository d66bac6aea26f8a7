"""Training metrics: TensorBoard event files, a JSONL log and a tqdm progress bar, written by host 0 only.

    writer = MetricsWriter(workdir, total_steps=1000, flops_per_token=6 * n_params, peak_flops=peak)
    writer.write(step, metrics)     # metrics: scalars (loss, lr, grad_norm, tokens, ...) from the step
    writer.close()

Each `write` adds throughput: tokens/s (from the step's `seq_tokens`, the tokens processed, else `tokens`)
and steps/s since the previous write (wall clock), and MFU =
flops_per_token * tokens/s / peak_flops when both are given (peak_flops is the whole job's peak: per-chip
peak times the number of chips, or `measure_peak_flops()` on CPU). Array-valued entries such as
per-domain losses are written as "name/<index>" or "name/<domain>" when `domain_names` are given.
On other hosts every method is a no-op.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm


def measure_peak_flops(n: int = 2048, repeats: int = 3, dtype=np.float32) -> float:
    """FLOP/s of a jitted n x n x n matmul on the default device (best of `repeats`)."""
    a = jax.numpy.ones((n, n), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


def flatten_metrics(metrics: Mapping[str, Any], domain_names: Sequence[str] | None = None) -> dict[str, float]:
    """Scalars as floats; 1-D arrays split into name/<domain or index>; larger arrays are dropped."""
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        value = np.asarray(jax.device_get(value))
        if value.ndim == 0:
            flat[name] = float(value)
        elif value.ndim == 1:
            labels = domain_names if domain_names is not None and len(domain_names) == len(value) else None
            for i, v in enumerate(value):
                flat[f"{name}/{labels[i] if labels else i}"] = float(v)
    return flat


def read_metrics(logdir: str | os.PathLike, up_to_step: int | None = None) -> list[dict[str, float]]:
    """The rows of logdir/metrics.jsonl, one per step (a step written again after a resume replaces the
    earlier row), in step order, up to `up_to_step`; [] without a file. A truncated last line is dropped."""
    path = os.path.join(logdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if up_to_step is None or row["step"] <= up_to_step:
                rows[int(row["step"])] = row
    return [rows[k] for k in sorted(rows)]


class MetricsWriter:
    """Host-0 writer of TensorBoard scalars, JSONL lines and a progress bar with ETA."""

    def __init__(self, logdir: str | os.PathLike, total_steps: int, *, initial_step: int = 0,
                 flops_per_token: float | None = None, peak_flops: float | None = None,
                 domain_names: Sequence[str] | None = None, progress: bool = True,
                 is_host0: bool | None = None, description: str = "train"):
        if flops_per_token is not None and flops_per_token <= 0:
            raise ValueError(f"flops_per_token must be > 0, got {flops_per_token}")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
        self.active = jax.process_index() == 0 if is_host0 is None else is_host0
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.domain_names = list(domain_names) if domain_names is not None else None
        self._last_time, self._last_step = time.perf_counter(), initial_step
        self._tb = self._jsonl = self._bar = None
        if not self.active:
            return
        os.makedirs(logdir, exist_ok=True)
        from tensorboardX import SummaryWriter  # loaded on host 0 only: the other hosts write no logs
        self._tb = SummaryWriter(os.fspath(logdir))
        self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a", encoding="utf-8")
        if progress:
            self._bar = tqdm(total=total_steps, initial=initial_step, desc=description, dynamic_ncols=True)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float] | None:
        """Logs one record at `step` (the number of steps done); returns what was written (host 0)."""
        if not self.active:
            return None
        now = time.perf_counter()
        elapsed, steps = max(now - self._last_time, 1e-9), step - self._last_step
        self._last_time, self._last_step = now, step
        record = flatten_metrics(metrics, self.domain_names)
        if steps > 0:
            record["steps_per_s"] = steps / elapsed
            tokens = record.get("seq_tokens", record.get("tokens"))
            if tokens is not None:
                # Tokens processed per step (the step's seq_tokens, else its loss tokens); the steps since
                # the last write are assumed alike.
                record["tokens_per_s"] = tokens * steps / elapsed
                if self.flops_per_token and self.peak_flops:
                    record["mfu"] = self.flops_per_token * record["tokens_per_s"] / self.peak_flops
        for name, value in record.items():
            if math.isfinite(value):     # NaN marks "undefined this step" (e.g. an empty tier): JSONL only
                self._tb.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": int(step), **record}) + "\n")
        self._jsonl.flush()
        if self._bar is not None:
            self._bar.update(max(steps, 0))
            shown = {k: record[k] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu") if k in record}
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        return record

    def flush(self) -> None:
        if self.active:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        self._tb.close()
        self._jsonl.close()
        self.active = False

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
