"""RL with curriculum sampling (RLCS) over GRPO, rewarded by the domain verifiers.

Paper recipe (docs/rl.md): GRPO without KL and entropy terms, clip-higher, per-sample loss aggregation,
rollout top-p 1.0, forced answering at the thinking budget, RLCS tiers with ratio-EMA expansion.
Unpublished numbers (group size, batch, lr, lengths) are set to common values; override them.
"""
import ml_collections

from experiments.configs.base import base_config, dataclass_defaults
from glmv_jax.rl.curriculum import CurriculumConfig
from glmv_jax.rl.grpo import GRPOConfig
from glmv_jax.rl.health import HealthConfig

CURRICULUM_SET_BY_RL = ("batch_size", "group_size", "seed")   # the rl block's own keys fill these


def rl_block(**kw) -> ml_collections.ConfigDict:
    r = ml_collections.ConfigDict(dict(
        sampler="rlcs",               # rlcs | uniform | dapo
        batch_size=32,                # groups trained on per iteration
        group_size=8,                 # G responses per prompt
        iterations=1000,
        max_new_tokens=8192,
        thinking_budget=None,         # tokens before </think> is forced; None = no forcing
        temperature=1.0,
        top_p=1.0,
        style="glm41v",               # response format (glm41v: <answer> tags; glm45v/glm46v: none)
        prompts_per_domain=4096,
        prompt_tiers=None,            # synthetic suite: tier weights of the prompt pool (None = all tiers)
        save_every=10,
        dapo_max_rounds=4,
        rollout_pad_steps=2,          # rollout prompt counts padded to B * 2^(k/2) (bounded compiles); 0 = off
        # generate's compaction: decode in segments of N steps, dropping finished rows once at least half are
        # (the same trajectories); 0 = one loop. Measured (benchmarks/rollout_skew.py, half the rows ending at
        # ~16 of 256 tokens, 32 rows, CPU): 1.76x rollout tokens/s at 32, 1.72x at 16, 1.56x at 64
        compact_every=32,
        # RLCS's offline difficulty: "measure" = pass@k of the starting checkpoint on the pool (k =
        # offline_samples; its rollouts are counted in the bill), "labels" = the records' difficulty fields.
        # The task generator's tier labels say pass rates 0.5-1.0 where a fresh SFT model samples 0.02-0.4.
        offline_difficulty="measure",
        offline_samples=4,
        # prompts measured per domain (0: the whole pool, as the paper); the others take their (domain, tier)
        # cell's measured mean. A subset bounds the pass's cost (k x prompts rollouts) on a big pool
        offline_prompts=0,
        # domain mix by pilot: weight each domain by its expected share of informative groups at the start,
        # dropping those below pilot_min_informative (all-wrong or all-right domains train nothing)
        pilot=True,
        pilot_min_informative=0.05,
        # ...and those whose measured mean reward does not lead "always answer the domain's most common answer"
        # by this many paired SEs (None: off): their informative groups are lucky guesses, and RL there only
        # moves the answer prior, flipping the greedy answers of near-ties together. On the demo's SFT models
        # (3 seeds) counting, GUI and math sat at their prior, and RL on them cost greedy counting up to -0.27
        pilot_min_lead_se=2.0,
        pilot_blind_weight=0.0,       # > 0: such domains keep this fraction of their weight instead of none
        # pool_tiers: undrawn prompts take their (domain, tier) cell's pooled online pass rate (each prompt is
        # drawn about once, so per-prompt estimates alone never correct the prior); ema_decay 0.5: a short run
        # should not spend its first iterations ramping up (0.8 from 1.0 needs ~10 to reach 1.9); fill_quota:
        # a domain's quota slots it cannot fill with informative groups go to other domains'.
        # domain_expansion (one ratio EMA per domain) is off: with fill_quota a domain's shortfall is filled
        # by the others, so per-domain EMAs only add rollouts where groups are zero-variance (a domain the
        # policy has collapsed on rolls out 4x its quota for nothing). Measured on the demo (60 iterations,
        # seed 0): 19384 rollouts, informative 0.46 rolled out / 0.945 trained with it; 13424, 0.65 / 0.937
        # without (DAPO 13776, 0.64 / 1.0); benchmarks/RESULTS.md
        curriculum=dataclass_defaults(CurriculumConfig, skip=CURRICULUM_SET_BY_RL, ema_decay=0.5, fill_quota=True,
                                      pool_tiers=True),
        # signal_rows_only: the loss is normalised by the rows that carry an advantage, so samplers that
        # train different shares of zero-variance groups take the same effective step
        grpo=dataclass_defaults(GRPOConfig, num_minibatches=4, signal_rows_only=True),
        domains=None,                 # the RL pool's domains (None: all of data.domains); one = single-domain RL
        # {domain: weakened verifier} from glmv_jax/rewards/weak.py: the weak-verifier experiment only
        reward_overrides={},
        # the reward-health guard (rl/health.py): every N iterations compare each domain's training reward with
        # its real-verifier reward on a fixed probe set; off (every=0) by default, it costs probe rollouts
        health=dataclass_defaults(HealthConfig),
    ))
    r.update(kw)
    return r


def get_config(arg=None):
    c = base_config(arg, stage="rl")
    c.data.kind = "rl"
    c.rl = rl_block()
    c.optimizer.update(lr=1e-6, warmup_steps=0, total_steps=4000, weight_decay=0.0, final_lr_fraction=1.0)
    c.model.update(dtype="bfloat16", remat="full")
    c.eval = ml_collections.ConfigDict(dict(per_domain=64, max_new_tokens=8192, batch_size=64, style="glm41v",
                                            seed=0, tiers=None))
    if c.runlocal or c.model.preset.startswith("tiny"):
        # 64 new tokens: the suite's longest gold responses over all tiers (counting ~60, grounding ~58 tokens
        # with the suite tokenizer) must fit, or the stage refuses to start (rl.stage's answer-budget check)
        c.rl.update(batch_size=8, group_size=4, iterations=4, max_new_tokens=64, prompts_per_domain=16,
                    save_every=2)
        c.rl.grpo.num_minibatches = 2
        c.optimizer.update(lr=1e-4, total_steps=16)
        c.model.update(dtype="float32", remat="none")
        c.eval.update(per_domain=8, max_new_tokens=64, batch_size=16)
    return c
