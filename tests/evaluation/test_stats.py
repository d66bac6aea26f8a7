"""Standard errors of held-out evaluation on constructed data, and the answer-prior baselines."""
import math

import numpy as np
import pytest

from glmv_jax.evaluation.baselines import baselines, well_formed
from glmv_jax.evaluation.stats import combine, mean_se, paired, summarize
from glmv_jax.rewards import compute_reward


def test_mean_se_is_the_sample_sd_over_root_n():
    x = [1.0, 0.0, 1.0, 1.0]
    mean, se = mean_se(x)
    assert mean == 0.75
    assert se == pytest.approx(math.sqrt(0.25) / 2)          # sd(ddof=1) = 0.5, n = 4
    assert mean_se([0.3]) == (0.3, 0.0)


def test_combine_averages_domains_and_adds_their_variances():
    mean, se = combine({"a": (0.2, 0.03), "b": (0.6, 0.04)})
    assert mean == pytest.approx(0.4)
    assert se == pytest.approx(0.05 / 2)                      # sqrt(0.03^2 + 0.04^2) / 2


def test_summarize_sampled_mean_at_k_uses_the_per_prompt_means():
    rows = [{"id": str(i), "domain": "d", "greedy": g, "sampled": s}
            for i, (g, s) in enumerate([(1, 0.75), (0, 0.25), (1, 0.5)])]
    table = summarize(rows)
    assert table["d"]["n"] == 3
    assert table["d"]["sampled"] == pytest.approx(0.5)
    assert table["d"]["sampled_se"] == pytest.approx(np.std([0.75, 0.25, 0.5], ddof=1) / math.sqrt(3))
    assert table["mean"]["greedy"] == pytest.approx(2 / 3)


def test_paired_se_comes_from_per_prompt_differences():
    rng = np.random.default_rng(0)
    before = rng.integers(0, 2, 200).astype(float)
    after = np.where(rng.random(200) < 0.2, 1.0, before)      # RL fixes some prompts, keeps the rest
    rows = lambda x, dom: [{"id": f"{dom}{i}", "domain": dom, "greedy": float(v)} for i, v in enumerate(x)]
    out = paired(rows(before, "a") + rows(before[:50], "b"), rows(after, "a") + rows(after[:50], "b"), ("greedy",))
    d = after - before
    a = out["domains"]["a"]
    assert a["greedy_delta"] == pytest.approx(d.mean())
    assert a["greedy_se"] == pytest.approx(d.std(ddof=1) / math.sqrt(200))
    # pairing removes the between-prompt variance: far below the unpaired SE of two independent means
    unpaired = math.hypot(before.std(ddof=1), after.std(ddof=1)) / math.sqrt(200)
    assert a["greedy_se"] < 0.6 * unpaired
    b = out["domains"]["b"]
    assert out["greedy_delta"] == pytest.approx((a["greedy_delta"] + b["greedy_delta"]) / 2)
    assert out["greedy_se"] == pytest.approx(math.hypot(a["greedy_se"], b["greedy_se"]) / 2)


def test_paired_refuses_different_prompt_sets():
    with pytest.raises(ValueError, match="same prompts"):
        paired([{"id": "1", "domain": "d", "greedy": 1.0}], [{"id": "2", "domain": "d", "greedy": 1.0}])


def test_baselines_on_constructed_records():
    train = [{"domain": "counting", "answer": a} for a in [3, 3, 3, 2, 1]]
    heldout = [{"domain": "counting", "answer": a} for a in [3, 2, 3, 5]]
    out = baselines(train, heldout)
    assert out["most_common"]["counting"] == pytest.approx(0.5)           # "3" right on 2 of 4
    assert out["chance"]["counting"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 3 + 0) / 4)   # 3 distinct guesses


@pytest.mark.parametrize("style", ["glm41v", "glm45v", "glm45v_nothink"])
def test_the_baseline_response_is_well_formed_in_every_style(style):
    assert compute_reward("counting", well_formed("4", style), 4, style=style).reward == 1.0
