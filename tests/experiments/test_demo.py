"""The embedded default runs end to end (smallest settings) and leaves its report; a rerun resumes; every
stage directory describes itself (chat / evaluate load it); a rerun that would change shapes is refused."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from experiments import chat, evaluate, run
from experiments.configs import demo
from glmv_jax.config import ConfigError
from glmv_jax.generate.loading import load_model
from glmv_jax.train.experiment import read_stage_config

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["0_pretrain", "1_sft", "2_rl"]


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


def test_every_stage_directory_restores_its_config_and_model(demo_run):
    workdir, _, _ = demo_run
    for name in STAGES:
        cfg = read_stage_config(workdir / name)
        assert cfg.stage == name.split("_", 1)[1] and (workdir / name / "config.json").is_file()
        assert cfg.model.text.mrope_section == demo.TEXT["mrope_section"]       # a tuple again, as in the run
        assert isinstance(cfg.data.domains, tuple)
        bundle = load_model(workdir / name)
        assert bundle.config.text.mrope_section == demo.TEXT["mrope_section"]


def test_chat_and_evaluate_run_on_stage_directories(demo_run, tmp_path):
    workdir, _, _ = demo_run
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    response = chat.main(["--checkpoint", str(workdir / "1_sft"), "--image", str(tmp_path / "red.png"),
                          "--max-new-tokens", "4"])
    assert isinstance(response, str)
    result = evaluate.main(["--checkpoint", str(workdir / "2_rl"), "--per-domain", "1", "--k", "0",
                            "--max-new-tokens", "4", "--domains", "counting"])
    assert set(result["greedy"]["accuracy"]) == {"counting"}


@pytest.mark.parametrize("stage, edit, key", [
    (0, lambda s: s.model.text.update(hidden_size=64), "model.text"),
    (1, lambda s: s.data.update(batch_size=8), "data.batch_size: saved 4, now 8"),
    (1, lambda s: s.data.update(tiers={"0": 1.0}), "data.tiers"),
    (2, lambda s: s.rl.update(group_size=4), "rl.group_size: saved 2, now 4"),
    (2, lambda s: s.rl.update(prompts_per_domain=8), "rl.prompts_per_domain"),
])
def test_rerun_with_a_shape_changing_config_is_refused_naming_the_key(demo_run, stage, edit, key):
    workdir, _, _ = demo_run
    cfg = demo.get_config("smoke")
    edit(cfg.stages[stage])
    with pytest.raises(ConfigError, match=rf"{STAGES[stage]} holds checkpoints of a different config \(.*{re.escape(key)}"):
        run.run_pipeline(cfg, str(workdir))


def test_rerun_may_change_steps_logging_and_checkpoint_cadence(demo_run):
    workdir, _, _ = demo_run
    cfg = demo.get_config("smoke")
    for stage in cfg.stages:
        stage.train.update(steps=stage.train.steps + 5, log_every=3, save_every=7)
    cfg.stages[2].rl.iterations = 9
    for name, stage in zip(STAGES, cfg.stages):
        run.check_stage(stage, str(workdir / name))
