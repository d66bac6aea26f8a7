"""The embedded default runs end to end (smallest settings) and leaves its report; a rerun resumes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "GLMV_JAX_XLA_CACHE": str(workdir / "xla")}
    cmd = [sys.executable, "-m", "experiments.run", "--config=experiments/configs/demo.py:smoke",
           f"--workdir={workdir}"]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert second.returncode == 0, second.stderr[-3000:]
    return workdir, first, second


def test_demo_writes_table_plot_and_checkpoints(demo_run):
    workdir, first, _ = demo_run
    assert "Greedy accuracy (mean verifier reward ± SE) after each stage" in first.stdout
    report = json.loads((workdir / "report.json").read_text())
    domains = {"counting", "math", "ocr", "chart", "grounding", "gui", "choice"}
    assert set(report["domains"]) == domains and set(report["eval"]) == {"sft", "rl"}
    assert {"greedy", "greedy_se", "sampled", "sampled_se", "n"} == set(report["eval"]["rl"]["ocr"])
    assert set(report["paired"]["rl_vs_sft"]["domains"]) == domains
    assert set(report["baselines"]) == {"most_common", "chance"}
    assert report["rl"]["rollouts"] > 0 and report["seconds"]["total"] > 0
    assert (workdir / "curves.png").stat().st_size > 10_000
    summary = json.loads((workdir / "summary.json").read_text())
    assert [s["stage"] for s in summary] == ["pretrain", "sft", "rl"]
    for stage in summary[1:]:
        assert set(stage["eval"]["accuracy"]) == {"counting", "math", "ocr", "chart", "grounding", "gui", "choice"}
        assert all(0.0 <= a <= 1.0 for a in stage["eval"]["accuracy"].values())
    for i, name in enumerate(["pretrain", "sft", "rl"]):
        assert any((workdir / f"{i}_{name}" / "checkpoints").iterdir())
    rl_log = [json.loads(l) for l in (workdir / "2_rl" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl_log] == [1, 2]
    assert {"reward", "informative_share", "grpo/clip_frac", "truncated_rate", "forced_rate", "reward_rolled",
            "reward_kept", "informative_share_rolled", "informative_share_trained", "rollouts_total"} <= set(rl_log[0])


def test_rerun_resumes_finished_stages_without_training(demo_run):
    workdir, _, second = demo_run
    summary = json.loads((workdir / "summary.json").read_text())
    # every stage restarts at its last checkpoint, which is its final step: nothing is trained again
    assert [s["start_step"] for s in summary] == [s["steps"] for s in summary]
