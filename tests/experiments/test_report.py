"""report.json / report.md from constructed stage summaries (no model run)."""
import json

import pytest

from experiments.report import build_report, markdown, write_report
from glmv_jax.evaluation.stats import summarize


def _eval(values):
    prompts = [{"id": f"{d}{i}", "domain": d, "greedy": v, "sampled": v / 2}
               for d, vs in values.items() for i, v in enumerate(vs)]
    return {"prompts": prompts, "summary": summarize(prompts),
            "baselines": {"most_common": {"a": 0.25, "b": 0.5}, "chance": {"a": 0.1, "b": 0.2}}}


def summaries():
    history = [{"reward_rolled": r, "reward_kept": r + 0.1, "informative_share_rolled": 0.5,
                "informative_share_trained": 1.0, "trained_groups": 4, "rollouts": 40, "reward_rolled/a": r}
               for r in (0.1, 0.2, 0.3, 0.4, 0.5)]
    return [{"stage": "sft", "history": [{"loss": 2.0}, {"loss": 1.0}], "eval": _eval({"a": [0, 0, 1, 1], "b": [1, 0]})},
            {"stage": "rl", "history": history, "eval": _eval({"a": [1, 0, 1, 1], "b": [1, 1]})}]


def test_report_json_holds_the_contract():
    report = build_report(summaries(), {"sft": 10.0, "rl": 20.0, "sft_eval": 1.0})
    assert report["domains"] == ["a", "b"]
    assert set(report["eval"]["rl"]["a"]) == {"greedy", "greedy_se", "sampled", "sampled_se", "n"}
    assert report["eval"]["sft"]["a"]["greedy"] == 0.5 and report["eval"]["rl"]["a"]["n"] == 4
    paired = report["paired"]["rl_vs_sft"]
    assert paired["domains"]["a"]["greedy_delta"] == pytest.approx(0.25)
    assert paired["domains"]["b"]["greedy_delta"] == pytest.approx(0.5)
    assert paired["greedy_delta"] == pytest.approx(0.375)
    assert paired["sampled_delta"] == pytest.approx(0.375 / 2)
    assert report["baselines"]["most_common"]["b"] == 0.5
    rl = report["rl"]
    assert rl["rollouts"] == 200 and rl["informative_share_trained"] == 1.0
    assert rl["reward_rolled_first"] == pytest.approx(0.2) and rl["reward_rolled_last"] == pytest.approx(0.4)
    assert report["seconds"]["total"] == 31.0


def test_report_md_marks_significant_deltas_and_files_are_written(tmp_path):
    text = markdown(build_report(summaries()))
    assert "Paired difference rl - sft" in text and "most_common" in text
    write_report(summaries(), str(tmp_path), {"sft": 1.0})
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["paired"]["rl_vs_sft"]["domains"]["b"]["greedy_delta"] == pytest.approx(0.5)
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "report.md").exists()
