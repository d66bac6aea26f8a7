"""AOT compile of a stage's train step without materializing parameters (glmv_jax/train/aot.py) and the
`python -m experiments.aot` entry point: the tiny preset on the 8 simulated CPU devices, per-device bytes
checked against the shardings computed independently, mesh/topology mismatches, and a TPU topology through
libtpu when it is installed."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments.configs import sft
from glmv_jax.train import aot

ROOT = Path(__file__).resolve().parents[2]
FAST = {"xla_backend_optimization_level": 0}     # LLVM codegen only: the HLO and its buffers are the same
SHAPES = dict(seq_len=64, batch_size=8, patch_budget=128)


def tiny_cfg(mesh: str = "dp2_fsdp2_tp2", **data):
    cfg = sft.get_config(f"model=tiny,mesh={mesh}")
    cfg.data.update({**SHAPES, **data})
    return cfg


@pytest.fixture(scope="module")
def compiled():
    plan = aot.make_plan(tiny_cfg(), aot.target_devices("cpu:8"), "cpu:8")
    return plan, aot.compile_train_step(plan, FAST)


def bytes_on_each_device(abstract_tree) -> dict:
    """Per device: the sum over leaves of the element count of the index block that device holds."""
    held: dict = {}
    for leaf in jax.tree.leaves(abstract_tree):
        blocks = leaf.sharding.devices_indices_map(tuple(leaf.shape))
        for device, index in blocks.items():
            count = math.prod(len(range(*s.indices(n))) for s, n in zip(index, leaf.shape))
            held[device] = held.get(device, 0) + count * np.dtype(leaf.dtype).itemsize
    return held


def test_memory_report_matches_the_shardings(compiled):
    plan, step = compiled
    report = aot.memory_report(step, plan, hbm_bytes=2**30)
    state = plan.abstract_state
    params = bytes_on_each_device(state.params)
    assert len(params) == 8 and len(set(params.values())) == 1          # every device holds the same bytes
    assert report["param_bytes_per_device"] == next(iter(params.values()))
    assert report["opt_state_bytes_per_device"] == max(bytes_on_each_device(state.opt_state).values())
    total = sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(state.params))
    assert report["param_bytes_total"] == total and report["param_bytes_per_device"] < total / 3   # sharded
    # XLA:CPU keeps no padding: its arguments are exactly the state's and the batch's shards.
    everything = bytes_on_each_device({"state": state, "batch": plan.abstract_batch})
    assert report["argument_bytes"] == max(everything.values())
    assert report["alias_bytes"] > 0.9 * report["output_bytes"] - 1024  # the donated state is reused
    assert report["temp_bytes"] > 0
    assert report["total_bytes"] == (report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
                                     + report["temp_bytes"])
    assert report["fits"] and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert not aot.memory_report(step, plan, hbm_bytes=2**20)["fits"]
    text = aot.format_report(report)
    assert "param_bytes_per_device" in text and "proxy" in text and "fits in" in text
    assert f"{aot.format_count(report['param_count'])} params" in text and "0.000B" not in text


def test_format_count_picks_the_unit_by_size():
    counts = (0, 994, 1_000, 12_346, 999_999, 1_234_567, 9_407_000_000, 106e9)
    assert [aot.format_count(n) for n in counts] == ["0", "994", "1.00K", "12.35K", "1.00M", "1.23M", "9.41B",
                                                     "106.00B"]


def test_compiled_step_takes_the_sharded_layout(compiled):
    plan, step = compiled
    state_in, batch_in = step.input_shardings[0]
    pixel = batch_in["pixel_values"]
    assert pixel.is_equivalent_to(plan.abstract_batch["pixel_values"].sharding, 2)
    kernel = state_in.params["text"]["layers"]["mlp"]["up"]["kernel"]
    assert kernel.spec == plan.param_shardings["text"]["layers"]["mlp"]["up"]["kernel"].spec


def test_abstract_batch_is_what_the_pipeline_yields(tmp_path):
    from glmv_jax.data.pipeline import make_pipeline
    from glmv_jax.train.experiment import setup
    for k in (1, 2):
        cfg = tiny_cfg(mesh="auto", num_records=4, image_size=32)
        cfg.train.grad_accum_steps = k
        cfg.mesh.ici, cfg.mesh.devices = {"data": 1}, 1
        exp = setup(cfg, str(tmp_path / f"k{k}"))
        batch = next(make_pipeline(cfg.data, exp.tokenizer, exp.processor, micro_batches=k))
        shapes = aot.abstract_batch_shapes(cfg.data, aot.model_config_from(cfg), k)
        assert sorted(shapes) == sorted(batch)
        for key, value in batch.items():
            assert (shapes[key].shape, shapes[key].dtype) == (value.shape, value.dtype), key


def test_mismatched_mesh_or_topology_raises():
    devices = aot.target_devices("cpu:8")
    with pytest.raises(aot.TopologyError, match=r"mesh \{'fsdp': 16\} does not fit topology 'cpu:8' \(8 devices\)"):
        aot.mesh_for_devices({"fsdp": 16}, devices, "cpu:8")
    with pytest.raises(aot.TopologyError, match="do not divide 8 devices"):
        aot.mesh_for_devices({"data": 3, "fsdp": -1}, devices, "cpu:8")
    with pytest.raises(aot.TopologyError, match="needs 256 simulated CPU devices but this process has 8"):
        aot.target_devices("cpu:256")
    with pytest.raises(aot.TopologyError, match="must look like 'cpu:256'"):
        aot.target_devices("cpu:lots")
    cfg = tiny_cfg()
    cfg.mesh.dcn = {"data": 2}
    with pytest.raises(aot.TopologyError, match="fold the mesh.dcn axes"):
        aot.make_plan(cfg, devices, "cpu:8")


def test_cli_runs_in_a_process_with_the_topology_devices():
    """cpu:4 starts a child with 4 devices; the fsdp 8 mesh does not fit it: a clear error, no compile."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([sys.executable, "-m", "experiments.aot", "--config=experiments/configs/sft.py:model=tiny,"
                          "mesh=fsdp8", "--topology=cpu:4"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0
    assert "mesh {'fsdp': 8} does not fit topology 'cpu:4' (4 devices)" in run.stderr, run.stderr[-2000:]


@pytest.mark.skipif(not aot.libtpu_available(), reason="libtpu not installed (optional: pip install libtpu)")
def test_tpu_topology_through_libtpu(tmp_path):
    devices = aot.target_devices("v5e:2x2")
    assert len(devices) == 4 and {d.platform for d in devices} == {"tpu"}
    with pytest.raises(aot.TopologyError, match="libtpu cannot describe TPU topology 'v5e:banana'"):
        aot.target_devices("v5e:banana")
    # Compiled in a child process: a libtpu compiler check failure aborts the whole process (it did on the
    # ViT's single segment-masked block, a batch without patch_frames).
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "experiments.aot", "--config=experiments/configs/sft.py:model=tiny",
                          "--topology=v5e:2x2", *[f"--config.data.{k}={v}" for k, v in SHAPES.items()],
                          f"--json={out}"], cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["platform"] == "tpu" and report["devices"] == 4 and report["fits"]
    assert 0 < report["param_bytes_per_device"] < report["param_bytes_total"] / 2
    assert report["argument_bytes"] >= report["param_bytes_per_device"] + report["opt_state_bytes_per_device"]


def test_gathered_activations_separates_parameters_from_activations(compiled):
    plan, step = compiled
    hlo = step.as_text()
    kernel = plan.abstract_params["text"]["layers"]["mlp"]["up"]["kernel"]           # [L, D, F]
    d, f = kernel.shape[1:]
    fake = (f"  %a = f32[{d},{f}]{{1,0}} all-gather(%x), dimensions={{0}}\n"          # one layer's weight
            f"  %b = bf16[{f},{d}]{{1,0}} all-gather(%y), dimensions={{1}}\n"         # ... transposed
            "  %c = f32[8,64,4,16]{3,2,1,0} all-gather(%z), dimensions={0}\n"        # rows of q: an activation
            "  %d = f32[8,64,4,16]{3,2,1,0} all-gather(%w), dimensions={0}\n")
    assert aot.gathered_activations(fake, plan.abstract_params) == [
        {"dtype": "f32", "shape": (8, 64, 4, 16), "count": 2, "bytes": 8 * 64 * 4 * 16 * 4}]
    # The tiny step gathers no decoder or ViT attention inputs (the per-device attention path).
    t = plan.model_config.text
    batch, length = plan.abstract_batch["input_ids"].shape
    q_elems = batch * length * t.num_attention_heads * t.dim_per_head
    assert all(math.prod(r["shape"]) != q_elems for r in aot.gathered_activations(hlo, plan.abstract_params, 100))
