"""Held-out evaluation: the pass@k estimator and score() against hand-computed values, and the
`experiments.evaluate` command on a tiny HF checkpoint (suite and manifest prompts) and a run directory."""

import contextlib
import io
import itertools
import json
import types
from math import comb

import numpy as np
import pytest

from experiments import evaluate as cli
from experiments.configs import demo
from glmv_jax.data.synthetic import generate, generate as suite
from glmv_jax.data.transforms import Processor
from glmv_jax.evaluation.evaluate import generate_answers, pass_at_k, pass_at_k_table, score
from glmv_jax.generate import sampler
from glmv_jax.generate.loading import load_model
from glmv_jax.generate.prompts import prompt_dicts
from glmv_jax.rewards import compute_reward
from tests.helpers import tiny_hf_dir

BOX = "<think>look</think><answer><|begin_of_box|>{}<|end_of_box|></answer>"


# ----------------------------------------------------------------------------------------------- pass@k

def test_pass_at_k_by_hand():
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)            # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)                   # 1 - C(3,2)/C(4,2)
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - 35 / 210)         # 1 - C(7,4)/C(10,4)
    assert pass_at_k(4, 1, 4) == 1.0                                  # every 4-subset holds the pass
    # the definition: the share of k-subsets of the n samples that hold at least one pass
    for n, c, k in [(6, 2, 3), (7, 1, 2), (8, 3, 5), (5, 0, 2)]:
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    for bad in [(3, 1, 4), (3, 4, 2), (3, 1, 0)]:
        with pytest.raises(ValueError, match="pass@k needs"):
            pass_at_k(*bad)


def test_pass_at_k_table_by_hand():
    records = [{"domain": "ocr", "tier": 0}, {"domain": "ocr", "tier": 1}, {"domain": "math"}]
    rewards = [[1.0, 0.75, 0.0, 0.0],          # 0.75 is not > threshold: c = 1 -> pass@2 = 1 - C(3,2)/C(4,2) = 0.5
               [0.8, 0.9, 0.0, 0.0],           # c = 2 -> 1 - C(2,2)/C(4,2) = 5/6
               [0.0, 0.0, 0.0, 0.0]]           # c = 0
    table = pass_at_k_table(records, rewards, k=2)
    assert table["pass_at_k"] == pytest.approx({"math": 0.0, "ocr": (0.5 + 5 / 6) / 2})
    assert table["by_tier"]["math"] == {"all": 0.0}
    assert table["by_tier"]["ocr"] == pytest.approx({"0": 0.5, "1": 5 / 6})
    assert table["sample_reward"] == pytest.approx({"math": 0.0, "ocr": 3.45 / 8})
    assert table["sample_reward_by_tier"]["ocr"] == pytest.approx({"0": 1.75 / 4, "1": 1.7 / 4})
    with pytest.raises(ValueError, match="rewards must be"):
        pass_at_k_table(records, [[1.0]], k=1)


def test_score_hand_made_responses():
    records = [{"domain": "counting", "answer": 3, "tier": 0}, {"domain": "counting", "answer": 3, "tier": 1},
               {"domain": "choice", "answer": "B"}, {"domain": "math", "answer": "1/2"},
               {"domain": "ocr", "answer": "cat"}, {"domain": "grounding", "answer": [[100, 100, 300, 300]]}]
    texts = [BOX.format(3),                                  # right
             "<think>hmm</think><answer>3</answer>",         # no box: format fails
             BOX.format("B"), BOX.format("0.5"), BOX.format("cap"), BOX.format("[[100,100,300,300]]")]
    result = score(records, texts, "glm41v")
    assert result["accuracy"] == pytest.approx({"choice": 1.0, "counting": 0.5, "grounding": 1.0, "math": 1.0,
                                                "ocr": 2 / 3})
    assert result["by_tier"]["counting"] == {"0": 1.0, "1": 0.0}
    assert result["format_rate"] == pytest.approx(5 / 6) and result["n"] == 6
    wrong = score(records[:1], [BOX.format(4)], "glm41v")
    assert wrong["accuracy"] == {"counting": 0.0} and wrong["format_rate"] == 1.0


# ----------------------------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny HF checkpoint whose vocabulary and special ids are those of a tokenizer.json built here."""
    return tiny_hf_dir(tmp_path_factory.mktemp("tiny_eval"))


SMALL = ["--max-new-tokens", "6", "--batch-size", "4", "--min-pixels", "256", "--max-pixels", "256"]


def run_cli(argv):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = cli.main(argv)
    return result, printed.getvalue()


def test_cli_on_a_tiny_hf_checkpoint(hf_dir, tmp_path):
    out = tmp_path / "res" / "results.json"
    argv = ["--checkpoint", str(hf_dir), "--domains", "counting", "choice", "--per-domain", "2", "--k", "2",
            "--samples", "4", "--out", str(out)] + SMALL
    result, printed = run_cli(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    greedy, sampled = result["greedy"], result["sampled"]
    assert set(greedy["accuracy"]) == set(sampled["pass_at_k"]) == {"counting", "choice"}
    values = list(greedy["accuracy"].values()) + list(sampled["pass_at_k"].values())
    values += [v for tiers in sampled["by_tier"].values() for v in tiers.values()]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert (sampled["k"], sampled["n"], result["style"]) == (2, 4, "glm41v")
    prompts = result["per_prompt"]
    assert [p["domain"] for p in prompts] == ["counting"] * 2 + ["choice"] * 2
    assert all(len(p["sample_rewards"]) == 4 and p["id"].split("-")[1] == "heldout" for p in prompts)
    for p in prompts:                                       # the stored rewards are the verifier's
        assert p["greedy_reward"] == compute_reward(p["domain"], p["greedy_response"], p["answer"]).reward
    for d in ("counting", "choice"):                        # the aggregates are those of the stored rewards
        mine = [p for p in prompts if p["domain"] == d]
        assert greedy["accuracy"][d] == pytest.approx(np.mean([p["greedy_reward"] for p in mine]))
        want = np.mean([pass_at_k(4, sum(r > 0.75 for r in p["sample_rewards"]), 2) for p in mine])
        assert sampled["pass_at_k"][d] == pytest.approx(want)
    assert "| counting | all | 2 |" in printed and "pass@2 (n=4)" in printed and "wrote" in printed


def test_cli_with_a_manifest(hf_dir, tmp_path):
    (tmp_path / "img").mkdir()
    lines = []
    for i, rec in enumerate(generate("counting", 2, seed=5, kind="rl", image_size=32) +
                            generate("choice", 3, seed=5, kind="rl", image_size=32)):
        rec["images"][0].save(tmp_path / "img" / f"{i}.png")
        lines.append(json.dumps({**rec, "images": [f"img/{i}.png"]}))
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    result, _ = run_cli(["--checkpoint", str(hf_dir), "--manifest", str(manifest), "--per-domain", "2",
                         "--k", "0"] + SMALL)
    assert [p["domain"] for p in result["per_prompt"]] == ["counting"] * 2 + ["choice"] * 2
    assert "sampled" not in result and set(result["greedy"]["accuracy"]) == {"counting", "choice"}
    only_choice, _ = run_cli(["--checkpoint", str(hf_dir), "--manifest", str(manifest), "--domains", "choice",
                            "--k", "0"] + SMALL)
    assert [p["domain"] for p in only_choice["per_prompt"]] == ["choice"] * 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "domain": "math", "messages": []}) + "\n")
    with pytest.raises(ValueError, match=r"record 1 has no \['answer'\]"):
        run_cli(["--checkpoint", str(hf_dir), "--manifest", str(bad)] + SMALL)


def test_cli_bad_arguments(hf_dir, tmp_path):
    base = ["--checkpoint", str(hf_dir)] + SMALL
    with pytest.raises(ValueError, match="--samples"):
        run_cli(base + ["--k", "4", "--samples", "2"])
    with pytest.raises(ValueError, match="--temperature must be > 0"):
        run_cli(base + ["--temperature", "0"])
    with pytest.raises(ValueError, match=r"unknown domains \['poetry'\]"):
        run_cli(base + ["--domains", "poetry"])
    with pytest.raises(ValueError, match="--tiers must look like"):
        run_cli(base + ["--tiers", "easy"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_cli(["--checkpoint", str(tmp_path / "nowhere")])
    with pytest.raises(FileNotFoundError, match="manifest"):
        run_cli(base + ["--manifest", str(tmp_path / "none.jsonl")])


def test_run_directory_settings(tmp_path):
    """A pipeline work directory: the last stage with checkpoints gives the suite's domains, image size and
    the eval block (tier mix, prompts per domain)."""
    stages = [json.loads(s.to_json_best_effort()) for s in demo.get_config("smoke").stages]
    stages[2]["data"]["domains"] = ["gui", "ocr"]
    (tmp_path / "config.json").write_text(json.dumps({"stages": stages}))
    (tmp_path / "2_rl" / "checkpoints").mkdir(parents=True)
    data, ev = cli.run_settings(str(tmp_path))
    assert list(data.domains) == ["gui", "ocr"] and data.image_size == 64 and ev["per_domain"] == 2
    args = cli.build_parser().parse_args(["--checkpoint", str(tmp_path)])
    records = cli.load_records(args, data, ev)
    assert [r["domain"] for r in records] == ["gui"] * 2 + ["ocr"] * 2
    assert all(r["images"][0].size == (64, 64) and r["tier"] in (0, 1) for r in records)   # eval tiers 0/1
    args = cli.build_parser().parse_args(["--checkpoint", str(tmp_path), "--tiers", "3=1", "--per-domain", "3"])
    assert [r["tier"] for r in cli.load_records(args, data, ev)] == [3] * 6


def test_generate_answers_compiles_once_and_matches_per_batch_generation(hf_dir):
    """Greedy evaluation over batches of different prompt lengths (and a smaller last batch): one compiled generation
    loop (every batch padded to one shape, ViT frame rows included), and the same answers as generating
    each batch at its own shapes (the previous path, one compile per shape)."""
    bundle = load_model(hf_dir)
    tok, n = bundle.tokenizer, 5
    processor = Processor.for_model(bundle.config, min_pixels=256, max_pixels=2304)
    records = (suite("counting", 3, seed=0, kind="rl", image_size=32) +
               suite("choice", 2, seed=0, kind="rl", image_size=48))
    exp = types.SimpleNamespace(model_config=bundle.config, tokenizer=tok, processor=processor)
    loop = sampler._generation_fn(bundle.config, n, False, tok.pad_id)
    before = loop._cache_size()
    texts = generate_answers(exp, bundle.params, records, max_new_tokens=n, batch_size=2)
    assert loop._cache_size() == before + 1
    force, extra_stops = sampler.answer_ids(tok, "glm41v")
    prompts = prompt_dicts(records, tok, processor)
    assert len({len(p["input_ids"]) for p in prompts}) > 1
    ref = []
    for start in range(0, len(prompts), 2):
        chunk = prompts[start:start + 2]
        out = sampler.generate(bundle.config, bundle.params, chunk, max_new_tokens=n, temperature=0.0,
                               stop_ids=tuple(tok.stop_ids) + extra_stops, force_answer_ids=force, pad_id=tok.pad_id)
        ref += [sampler.response_text(tok, out["tokens"][r], out["lengths"][r]) for r in range(len(chunk))]
    assert loop._cache_size() >= before + 3                 # the per-batch path compiled for several shapes
    assert texts == ref
