"""Answer-prior baselines for held-out evaluation: what a model that ignores the image can score.

    most_common: always answer the domain's most frequent gold answer of the TRAIN split (same tier mix);
    chance:      a guess drawn uniformly from the domain's distinct train answers (the `max_candidates`
                 most frequent ones): per held-out prompt the fraction of candidates the verifier accepts.

Both are scored by the real verifier on a well-formed response (think block, boxed answer in the style), so
they use the same reward definition as the model's evaluation. Answers are compared by their boxed text
(data.synthetic.answer_text).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from glmv_jax.data.chat_template import format_response
from glmv_jax.data.synthetic import answer_text
from glmv_jax.rewards import compute_rewards


def answer_counts(records: Sequence[dict]) -> dict[str, Counter]:
    """{domain: Counter of boxed answer texts} of prompt records."""
    counts: dict[str, Counter] = {}
    for rec in records:
        counts.setdefault(rec["domain"], Counter())[answer_text(rec["domain"], rec["answer"])] += 1
    return counts


def well_formed(text: str, style: str) -> str:
    """A response in the reward `style` whose boxed answer is `text` (empty think block)."""
    response = format_response("", text, "", "glm41v" if style == "glm41v" else "glm45v")
    return response.split("</think>\n", 1)[1] if style == "glm45v_nothink" else response


def candidate_rewards(domain: str, candidates: Sequence[str], answer, style: str) -> np.ndarray:
    """[len(candidates)] verifier rewards of well-formed responses answering each candidate text."""
    responses = [well_formed(text, style) for text in candidates]
    return np.array([r.reward for r in compute_rewards(domain, responses, answer, style=style)])


def baselines(train_records: Sequence[dict], heldout_records: Sequence[dict], style: str = "glm41v",
              max_candidates: int = 64) -> dict[str, dict[str, float]]:
    """-> {"most_common": {domain: mean reward}, "chance": {domain: mean reward}} over the held-out records,
    with the answer priors taken from train_records."""
    counts = answer_counts(train_records)
    most_common, chance = {}, {}
    by_domain: dict[str, list[dict]] = {}
    for rec in heldout_records:
        by_domain.setdefault(rec["domain"], []).append(rec)
    for domain, recs in sorted(by_domain.items()):
        if domain not in counts:
            continue
        ranked = [text for text, _ in counts[domain].most_common(max_candidates)]
        rewards = np.stack([candidate_rewards(domain, ranked, rec["answer"], style)
                             for rec in recs])                                  # [n, candidates]
        most_common[domain] = float(rewards[:, 0].mean())
        chance[domain] = float(rewards.mean())
    return {"most_common": most_common, "chance": chance}


def most_common_rewards(prior_records: Sequence[dict], records: Sequence[dict],
                        style: str = "glm41v") -> dict[str, float]:
    """{id of each of `records`: reward of answering its domain's most frequent gold answer in `prior_records`}:
    the blind answer prior scored prompt by prompt."""
    top = {domain: counter.most_common(1)[0][0] for domain, counter in answer_counts(prior_records).items()}
    return {str(rec["id"]): float(candidate_rewards(rec["domain"], [top[rec["domain"]]], rec["answer"], style)[0])
            for rec in records if rec["domain"] in top}
