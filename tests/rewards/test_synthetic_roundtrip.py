"""Contract with the built-in task suite: its reference responses earn full reward, in both styles,
and the same responses with a wrong box earn none (the suite's answers are in each verifier's form)."""
import pytest

from glmv_jax.data import synthetic
from glmv_jax.rewards import compute_reward
from tests.rewards.helpers import BOX_CLOSE, BOX_OPEN


@pytest.mark.parametrize("style", ["glm41v", "glm45v"])
@pytest.mark.parametrize("domain", synthetic.DOMAINS)
def test_suite_reference_responses_earn_full_reward(domain, style):
    for record in synthetic.generate(domain, 6, seed=3, split="heldout", style=style):
        response = record["messages"][-1]["content"]
        result = compute_reward(domain, response, record["answer"], style=style)
        assert result.reward == 1.0, (response, record["answer"], result)
        start, end = response.index(BOX_OPEN) + len(BOX_OPEN), response.index(BOX_CLOSE)
        wrong = response[:start] + "[0, 0, 1, 1] or 0" + response[end:]
        assert compute_reward(domain, wrong, record["answer"], style=style).reward == 0.0
