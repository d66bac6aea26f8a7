"""Helpers shared by the benchmarks: the machine line of a RESULTS.md section, load average, CPU+wall clocks,
abstract (shape-only) params and train states for compile-only measurements, and appending to RESULTS.md.

New benchmarks import from here (and from train_step.py for its configs, inputs and step runner).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

from glmv_jax.config import ModelConfig, TextConfig, VisionConfig

RESULTS = Path(__file__).with_name("RESULTS.md")


def glmv_config(vision: dict, text: dict, special_base: int | None = None) -> ModelConfig:
    """A GLM-V-shaped benchmark config: interleaved M-RoPE (8, 12, 12) over the whole head unless `text` says
    otherwise, pad id 0, eos (1,), and the six vision special tokens at ids special_base .. special_base + 5
    (default: vocab_size - 10)."""
    text = dict(dict(mrope_section=(8, 12, 12), partial_rotary_factor=1.0, pad_token_id=0, eos_token_id=(1,)), **text)
    base = text["vocab_size"] - 10 if special_base is None else special_base
    names = ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
             "video_start_token_id", "video_end_token_id")
    return ModelConfig(vision=VisionConfig(**vision), text=TextConfig(**text),
                       **{name: base + i for i, name in enumerate(names)}).validate()


def uptime() -> str:
    """`uptime` output (the machine load a result was taken under)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_line() -> str:
    """Date, CPU / accelerator, core count and library versions for a RESULTS.md heading."""
    import jax
    device = jax.devices()[0]
    where = device.device_kind if device.platform != "cpu" else (platform.processor() or platform.machine())
    return (f"{datetime.datetime.now():%Y-%m-%d %H:%M} | {where} ({device.platform}, {jax.device_count()} "
            f"device{'s' if jax.device_count() > 1 else ''}), {os.cpu_count()} cores | jax {jax.__version__}")


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """(fn(), wall seconds, process CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def clock(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    return timed(fn)[1:]


def interleaved(contenders: dict, repeats: int, warmup: bool = False) -> dict[str, tuple[float, float]]:
    """`repeats` rounds of one call of each contender in turn (all see the same load) -> best (wall, cpu) each;
    `warmup` calls each once first, untimed."""
    if warmup:
        for fn in contenders.values():
            fn()
    best = {name: (float("inf"), float("inf")) for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            wall, cpu = clock(fn)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def abstract_params(config):
    """ShapeDtypeStruct tree of the model's params (no init program is compiled)."""
    import jax
    from glmv_jax.models.glmv import init_params
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def append_results(text: str) -> None:
    """Appends a section to RESULTS.md (re-read right before writing: other benchmarks append too)."""
    previous = RESULTS.read_text() if RESULTS.exists() else ""
    with RESULTS.open("a") as f:
        f.write(("\n" if previous and not previous.endswith("\n\n") else "") + text)
