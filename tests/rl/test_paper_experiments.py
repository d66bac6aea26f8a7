"""The paper's RL experiments (benchmarks/transfer.py, benchmarks/weak_verifier.py): the transfer matrix built
from constructed evaluations, single-domain RL pools, and the weak-verifier experiment end to end at the
demo's smoke settings (the reward-health checks reach the history, the checkpoint and the report)."""
import json

import ml_collections
import numpy as np
import pytest

from benchmarks import transfer, weak_verifier
from glmv_jax.rl import stage


def prompts(domain_scores: dict[str, list[float]]) -> list[dict]:
    return [{"id": f"{d}-{i}", "domain": d, "greedy": s, "sampled": None}
            for d, scores in domain_scores.items() for i, s in enumerate(scores)]


def test_transfer_matrix_is_the_paired_delta_of_seed_averaged_prompts():
    sft = prompts({"a": [0, 0, 1, 1], "b": [1, 0, 1, 0]})
    runs = [{"row": "a", "seed": 0, "eval": {"prompts": prompts({"a": [1, 0, 1, 1], "b": [1, 0, 1, 0]})}},
            {"row": "a", "seed": 1, "eval": {"prompts": prompts({"a": [1, 1, 1, 1], "b": [0, 0, 1, 0]})}},
            {"row": transfer.MIX, "seed": 0, "eval": {"prompts": prompts({"a": [0, 0, 1, 1], "b": [1, 1, 1, 1]})}}]
    matrix = transfer.transfer_matrix(sft, runs)
    assert list(matrix) == ["a", transfer.MIX]               # single domains first, the mix last
    # row a, column a: seed means [1, .5, 1, 1] - [0, 0, 1, 1] = [1, .5, 0, 0]
    cell = matrix["a"]["a"]
    assert cell["delta"] == pytest.approx(0.375) and cell["n"] == 4
    assert cell["se"] == pytest.approx(np.std([1, .5, 0, 0], ddof=1) / 2)
    assert matrix["a"]["b"]["delta"] == pytest.approx(-0.125)
    assert matrix["a"]["mean"]["delta"] == pytest.approx((0.375 - 0.125) / 2)
    assert matrix[transfer.MIX]["b"]["delta"] == pytest.approx(0.5) and matrix[transfer.MIX]["a"]["delta"] == 0
    text = transfer.table(matrix, {"accuracy": {"a": 0.5, "b": 0.5}, "mean": 0.5})
    assert "| a | **+0.375" not in text and "| mix-all |" in text      # 0.375 < 2 SE (0.239 * 2): not bold


def test_transfer_rows_restrict_the_rl_pool_and_keep_every_eval_domain():
    args = transfer.parse_args(["--smoke", "--rows", "ocr,mix-all", "--seeds", "0"])
    cfg = transfer.rl_config(args, "ocr", 0, "/nowhere")
    assert list(cfg.rl.domains) == ["ocr"] and cfg.rl.curriculum.expansion is False and cfg.rl.pilot is False
    assert len(cfg.data.domains) == 7 and cfg.eval.samples == 0
    assert transfer.rl_config(args, transfer.MIX, 0, "/nowhere").rl.domains is None
    records = stage.pool_records(cfg, "rl", 3)
    assert {r["domain"] for r in records} == {"ocr"} and len(records) == 3
    with pytest.raises(SystemExit):
        transfer.parse_args(["--rows", "poetry"])


def test_rl_domains_and_overrides_are_checked():
    cfg = ml_collections.ConfigDict({"data": {"domains": ["ocr", "gui"]},
                                     "rl": {"domains": ["chess"], "reward_overrides": {}}})
    with pytest.raises(ValueError, match="rl.domains"):
        stage.rl_domains(cfg)
    cfg.rl.domains = None
    cfg.rl.reward_overrides = {"math": "contains_gold"}
    with pytest.raises(ValueError, match="rl.reward_overrides names 'math'"):
        stage.reward_overrides(cfg, ["ocr", "gui"])
    cfg.rl.reward_overrides = {"ocr": "lenient"}
    with pytest.raises(ValueError, match="unknown weakened verifier"):
        stage.reward_overrides(cfg, ["ocr", "gui"])


@pytest.fixture(scope="module")
def weak_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("weak")
    weak_verifier.main(["--smoke", "--iterations", "2", "--every", "1", "--probe-per-domain", "2",
                        "--probe-samples", "2", "--eval-per-domain", "2", "--seeds", "0", "--out", str(out),
                        "--no-results"])
    return json.loads((out / "weak_verifier.json").read_text()), out


def test_weak_verifier_experiment_records_checks_flags_and_paired_results(weak_report):
    report, out = weak_report
    assert list(report["summary"]) == list(weak_verifier.RUNS)
    for name in weak_verifier.RUNS:
        result = json.loads(next((out / "runs").glob(f"{name.replace('+', '_')}_seed0_it2")).joinpath(
            "result.json").read_text())
        checks = result["health"]["checks"]
        assert [c["iteration"] for c in checks] == [0, 1, 2]              # the baseline, then every iteration
        assert all(len(c["probe"][d]) == 2 for c in checks for d in c["probe"]) and len(checks[0]["probe"]) == 7
        assert all("health/counting/divergence" in row and "health/probe_rollouts" in row
                   for row in result["history"])
        assert result["history"][0]["health/probe_rollouts"] == 7 * 2 * 2
    s = report["summary"]["weak+guard"]
    assert s["others_vs_real"]["domains"].keys() == set(report["sft_accuracy"]) - {"counting"}
    assert report["settings"]["health"]["action"] == "pause" and (out / "weak_verifier.png").stat().st_size > 0


def test_the_reward_health_state_is_checkpointed_with_the_sampler(weak_report):
    _, out = weak_report
    stage_dir = out / "runs" / "weak_guard_seed0_it2"
    states = sorted((stage_dir / "checkpoints").rglob("*"))
    text = " ".join(p.read_text(errors="ignore") for p in states if p.is_file() and p.stat().st_size < 1_000_000)
    assert "reward_health" in text and "probe" in text


def test_results_sections_name_the_machine_and_copy_the_plot(weak_report, tmp_path, monkeypatch):
    from benchmarks import rl_runs
    report, out = weak_report
    monkeypatch.setattr(rl_runs, "RESULTS", tmp_path / "RESULTS.md")
    monkeypatch.setattr(rl_runs, "PLOTS", tmp_path / "plots")
    weak_verifier.append_results(report, "| the table |", out / "weak_verifier.png")
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Weak verifier and the reward-health guard" in text and "cores, jax" in text and "| the table |" in text
    assert len(list((tmp_path / "plots").glob("weak_verifier-*.png"))) == 1
    assert len(list((tmp_path / "plots").glob("weak_verifier-*.json"))) == 1
