"""benchmarks/accelerator.py: the data-sheet lookup, and the whole script at --tiny sizes on CPU (every
section runs, what XLA:CPU cannot run is listed as skipped with its reason; no timing is asserted)."""

from __future__ import annotations

import json

import jax
import pytest

from benchmarks import accelerator


@pytest.mark.parametrize("kind,name", [("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
                                       ("NVIDIA H200", "H200 SXM"), ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
                                       ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("NVIDIA L4", "L4"),
                                       ("NVIDIA L40S", "L40S"), ("NVIDIA A10", "A10")])
def test_card_lookup(kind, name):
    card = accelerator.card_spec(kind)
    assert card["name"] == name and card["bf16_flops"] > 1e14 and card["hbm_bytes_s"] > 1e11


@pytest.mark.parametrize("kind", ["TPU v5 lite", "NVIDIA A10G", "cpu"])
def test_unknown_card(kind):
    assert accelerator.card_spec(kind) is None


def test_tiny_run_on_cpu(tmp_path):
    assert jax.default_backend() == "cpu"
    out = accelerator.main(["--tiny", "--repeats", "1", "--no-results", "--json", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text())["params"] == out["params"] > 0
    train, decode, moe = out["train"], out["decode"], out["moe"]
    assert train["attention"] == "einsum" and train["step_s"] > 0 and train["model_flops"] > 0
    assert train["mfu_measured"] > 0 and train["mfu_card"] is None
    assert decode["emitted"] == decode["new_tokens"] and decode["steps_s"] > 0
    assert decode["bytes_per_step"] == decode["weight_bytes"] + decode["kv_bytes"] > 0
    assert decode["of_measured_bw"] > 0 and decode["of_hbm"] is None
    paths = {r["path"]: r for r in moe["rows"]}
    assert set(paths) == {"dropless ragged_dot", "dropless tiled grouped matmul", "dense all-experts einsum"}
    assert all(r["status"] == "ok" and r["step_s"] > 0 for r in paths.values())
    assert paths["dense all-experts einsum"]["vs_dense"] == 1.0
    skipped = " | ".join(f"{s['what']}: {s['why']}" for s in out["skipped"])
    for needle in ("cuDNN attention", "ragged_all_to_all", "XLA:CPU has no ragged-all-to-all", "data sheet"):
        assert needle in skipped
    text = accelerator.report(out)
    assert text.startswith("## accelerator benchmark (benchmarks/accelerator.py --tiny)")
    assert text.count("| MoE layer fwd+bwd:") == 3 and "- skipped: cuDNN attention" in text
