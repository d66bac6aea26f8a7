"""A stage resumed after an interruption reports the same metrics history (what curves.png and report.md are
drawn from) as one that ran straight through: every step once, the rows before the resume included."""
import shutil

import numpy as np

from experiments import run
from experiments.configs import demo
from glmv_jax.train.metrics import read_metrics


def sft_stage(steps: int):
    cfg = demo.get_config("smoke").stages[1]
    cfg.train.update(steps=steps, save_every=2, log_every=1, keep=3)
    cfg.optimizer.update(warmup_steps=1, total_steps=4)
    return cfg


def losses(history):
    return [(int(h["step"]), float(h["loss"])) for h in history]


def test_a_resumed_stage_reports_the_uninterrupted_history(tmp_path):
    straight = run.run_stage(sft_stage(4), str(tmp_path / "straight"))
    run.run_stage(sft_stage(3), str(tmp_path / "resumed"))
    steps = sorted((tmp_path / "resumed" / "checkpoints").glob("[0-9]*"), key=lambda p: int(p.name))
    assert [p.name for p in steps][-2:] == ["2", "3"]
    shutil.rmtree(steps[-1])              # killed after logging step 3, before its checkpoint: step 3 replays
    resumed = run.run_stage(sft_stage(4), str(tmp_path / "resumed"))
    assert [s for s, _ in losses(resumed["history"])] == [1, 2, 3, 4]
    np.testing.assert_allclose([l for _, l in losses(resumed["history"])],
                               [l for _, l in losses(straight["history"])], rtol=1e-6)
    on_disk = read_metrics(tmp_path / "resumed" / "logs")
    assert [int(r["step"]) for r in on_disk] == [1, 2, 3, 4]          # the replayed step 3 once
    assert sum(1 for _ in open(tmp_path / "resumed" / "logs" / "metrics.jsonl")) == 5   # ... though written twice
