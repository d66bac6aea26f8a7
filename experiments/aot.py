"""Compile a stage's train step ahead of time for a target mesh and print its per-device memory.

    python -m experiments.aot --config=experiments/configs/pretrain.py:model=glm41v_9b --topology=cpu:256 --hbm_gib=95
    python -m experiments.aot --config=experiments/configs/sft.py:model=glm45v,mesh=fsdp2_ep4 --topology=cpu:8
    python -m experiments.aot --config=experiments/configs/sft.py:model=glm41v_9b --topology=v5e:16x16 \
        --hbm_gib=16 --config.train.grad_accum_steps=8

No parameter is materialized (glmv_jax/train/aot.py). `--topology=cpu:N` runs the compile in a child
process with N simulated CPU devices (its memory numbers are XLA:CPU's: a proxy); a TPU topology name
compiles for compile-only TPU devices through libtpu (pip install libtpu). Exit status 0 when the step
fits `--hbm_gib`, 3 when it does not.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:variants]", lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", "cpu:8", "cpu:N (simulated CPU devices) or a TPU topology (v5e:16x16)")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 16.0, "device memory to check against, GiB (v5e 16, v5p 95, H100 80)")
_FAST = flags.DEFINE_bool("fast_compile", False, "XLA backend optimization level 0 (quicker CPU compiles; "
                          "the HLO passes and so the memory numbers are unchanged)")
_JSON = flags.DEFINE_string("json", "", "also write the report as JSON here")
_CHILD = "GLMV_AOT_CHILD"


def child_env(count: int, env: dict | None = None) -> dict:
    """The environment of a process with `count` simulated CPU devices (other XLA flags kept)."""
    env = dict(os.environ if env is None else env)
    xla = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{xla} --xla_force_host_platform_device_count={count}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env[_CHILD] = "1"
    return env


def main(argv):
    del argv
    from glmv_jax.train import aot
    topology = _TOPOLOGY.value
    count = aot.cpu_device_count(topology)
    if count is not None and os.environ.get(_CHILD) != "1":
        # The device count is fixed when the CPU backend starts: compile in a fresh process.
        sys.exit(subprocess.run([sys.executable, "-m", "experiments.aot", *sys.argv[1:]], env=child_env(count)).returncode)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")   # TPU topologies: compile-only devices, no TPU backend needed
    cfg = _CONFIG.value
    from experiments.configs.base import validate
    validate(cfg)
    start = time.perf_counter()
    devices = aot.target_devices(topology)
    plan = aot.make_plan(cfg, devices, topology)
    planned = time.perf_counter()
    compiled = aot.compile_train_step(plan, {"xla_backend_optimization_level": 0} if _FAST.value else None)
    compiled_at = time.perf_counter()
    report = aot.memory_report(compiled, plan, hbm_bytes=_HBM_GIB.value * 2**30)
    report.update(topology=topology, stage=cfg.stage, preset=cfg.model.preset, plan_s=planned - start,
                  compile_s=compiled_at - planned, batch={"rows": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
                                                          "patch_budget": cfg.data.patch_budget,
                                                          "grad_accum_steps": cfg.train.grad_accum_steps})
    print(f"{cfg.stage} / {cfg.model.preset} on {topology}: plan {report['plan_s']:.1f} s, "
          f"lower + compile {report['compile_s']:.1f} s")
    print(aot.format_report(report))
    gathered = aot.gathered_activations(compiled.as_text(), plan.abstract_params)
    report["gathered_activations"] = [dict(r, shape=list(r["shape"])) for r in gathered]
    if gathered:
        print("largest all-gathers that are not parameters (activations copied onto every device?):")
        for r in gathered:
            print(f"  {r['dtype']}{list(r['shape'])} x{r['count']}: {r['bytes'] / 2**20:,.1f} MiB")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(report, f, indent=1)
    sys.exit(0 if report["fits"] else 3)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
