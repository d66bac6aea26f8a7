"""Multi-domain reward system: format gate, box extraction, one verifier per domain, judge hook.

    from glmv_jax.rewards import compute_reward
    r = compute_reward("math", response, "1/2", style="glm41v")   # RewardResult(reward, format_ok, extracted, info)
"""
from glmv_jax.rewards import registry
from glmv_jax.rewards.compute import compute_reward, compute_rewards
from glmv_jax.rewards.registry import register_judge, unregister_judge
from glmv_jax.rewards.result import STYLES, RewardConfig, RewardResult, count_reasons

__all__ = ["compute_reward", "compute_rewards", "count_reasons", "RewardResult", "RewardConfig", "STYLES", "registry",
           "register_judge", "unregister_judge"]
