"""GRPO: advantages by hand, the loss against a NumPy reference, clip-higher, gradients, and the update
learning a bandit with a tiny real (bigram softmax) policy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from glmv_jax.rl import grpo
from glmv_jax.rl.grpo import GRPOConfig
from glmv_jax.train.optimizer import build_optimizer
from glmv_jax.train.state import train_state_from_params


# Jitted once per (config, shapes): eager op-by-op dispatch of the loss and its gradient is slower on this CPU.
loss_jit = jax.jit(grpo.grpo_loss, static_argnums=(4,))
grad_jit = jax.jit(jax.grad(lambda new, *args, **kw: grpo.grpo_loss(new, *args, **kw)[0]), static_argnums=(4,))


# ------------------------------------------------------------------------------------------- advantages

def test_advantages_by_hand():
    rewards = np.array([[1, 0, 0, 1], [1, 1, 1, 1], [0.5, 0, 1, 0.5], [0, 0, 0, 0]], np.float32)
    a = np.sqrt(3) / 2                                     # 0.5 / unbiased std sqrt(1/3)
    b = 0.5 / np.sqrt(0.5 / 3)
    expected = [[a, -a, -a, a], [0, 0, 0, 0], [0, -b, b, 0], [0, 0, 0, 0]]
    np.testing.assert_allclose(grpo.group_advantages(rewards, std_eps=0.0), expected, rtol=1e-6)
    centred = [[.5, -.5, -.5, .5], [0, 0, 0, 0], [0, -.5, .5, 0], [0, 0, 0, 0]]
    np.testing.assert_allclose(grpo.group_advantages(rewards, normalize_std=False), centred, rtol=1e-6)
    np.testing.assert_allclose(grpo.group_advantages(rewards, std_ddof=0, std_eps=0.0)[0], [1, -1, -1, 1], rtol=1e-6)
    flat = grpo.group_advantages(rewards.reshape(-1), group_size=4, std_eps=0.0)
    np.testing.assert_allclose(flat, np.reshape(expected, -1), rtol=1e-6)
    stats = grpo.group_stats(rewards)
    np.testing.assert_array_equal(stats.zero_variance, [False, True, False, True])
    np.testing.assert_allclose(stats.mean, [0.5, 1.0, 0.5, 0.0])
    np.testing.assert_allclose(stats.std, [np.sqrt(1 / 3), 0.0, np.sqrt(0.5 / 3), 0.0])
    np.testing.assert_allclose(stats.advantages, grpo.group_advantages(rewards))


def test_each_advantage_setting_changes_the_result():
    """normalize_std, std_ddof, std_eps and zero_var_eps, each on rewards where its effect is known by hand;
    GRPOConfig.advantage_settings carries them to group_stats."""
    rewards = np.array([[1, 0, 0, 1], [0.3, 0.3, 0.3, 0.3 + 4e-4]], np.float64)
    default = GRPOConfig()
    base = grpo.group_stats(rewards, **default.advantage_settings).advantages
    np.testing.assert_allclose(base[0], np.array([1, -1, -1, 1]) * 0.5 / (np.sqrt(1 / 3) + 1e-6), rtol=1e-6)
    assert base[1, 3] > 0 and base[1, 0] < 0                      # std 1.7e-4 (ddof 0) > zero_var_eps 1e-6
    settings = lambda **kw: dataclasses.replace(default, **kw).advantage_settings
    ddof0 = grpo.group_stats(rewards, **settings(std_ddof=0)).advantages
    np.testing.assert_allclose(ddof0[0], np.array([1, -1, -1, 1]) * 0.5 / (0.5 + 1e-6), rtol=1e-6)   # std 0.5
    eps = grpo.group_stats(rewards, **settings(std_eps=0.5)).advantages
    np.testing.assert_allclose(eps[0], np.array([1, -1, -1, 1]) * 0.5 / (np.sqrt(1 / 3) + 0.5), rtol=1e-6)
    coarse = grpo.group_stats(rewards, **settings(zero_var_eps=1e-3))
    np.testing.assert_array_equal(coarse.zero_variance, [False, True])
    assert np.all(coarse.advantages[1] == 0.0) and np.array_equal(coarse.advantages[0], base[0])
    centred = grpo.group_stats(rewards, **settings(normalize_std=False)).advantages
    np.testing.assert_allclose(centred[0], [.5, -.5, -.5, .5], rtol=1e-6)


def test_zero_variance_groups_get_exact_zero():
    rewards = np.full((3, 5), 0.3, np.float32) + np.array([[0], [1e-8], [0.7]], np.float32)
    assert np.all(np.asarray(grpo.group_advantages(rewards)) == 0.0)


def test_advantage_errors():
    with pytest.raises(ValueError, match="at least 2 samples"):
        grpo.group_advantages(np.zeros((4, 1)))
    with pytest.raises(ValueError, match="group_size"):
        grpo.group_advantages(np.zeros(10), group_size=4)
    with pytest.raises(ValueError, match="num_groups, G"):
        grpo.group_advantages(np.zeros((2, 2, 2)))


# ------------------------------------------------------------------------------------------- log-probs

def test_token_logprobs_and_entropy_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(2, 5))
    for temp in (1.0, 0.7):
        x = logits.astype(np.float64) / temp
        logz = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
        logp_ref = np.take_along_axis(x, targets[..., None], -1)[..., 0] - logz
        p = np.exp(x - logz[..., None])
        ent_ref = -(p * np.log(p)).sum(-1)
        logp, ent = jax.jit(grpo.token_logprobs, static_argnames=("temperature", "with_entropy"))(
            jnp.asarray(logits), jnp.asarray(targets), temperature=temp, with_entropy=True)
        np.testing.assert_allclose(logp, logp_ref, atol=2e-5)
        np.testing.assert_allclose(ent, ent_ref, atol=2e-5)
    bf16 = grpo.token_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
    assert bf16.dtype == jnp.float32
    with pytest.raises(ValueError, match="do not match"):
        grpo.token_logprobs(jnp.asarray(logits), jnp.asarray(targets[:, :4]))


# ------------------------------------------------------------------------------------------- the loss

def numpy_loss(new, old, adv, mask, cfg, ref=None, ent=None):
    """Straightforward loop reference of the GRPO loss."""
    B, T = mask.shape
    adv = np.broadcast_to(adv[:, None], (B, T)) if adv.ndim == 1 else adv
    tok = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            r = np.exp(new[b, t] - old[b, t])
            rc = min(max(r, 1 - cfg.eps_low), 1 + cfg.eps_high)
            loss = max(-adv[b, t] * r, -adv[b, t] * rc)
            if cfg.dual_clip is not None and adv[b, t] < 0:
                loss = min(loss, -adv[b, t] * cfg.dual_clip)
            if cfg.kl_coef:
                d = ref[b, t] - new[b, t]
                loss += cfg.kl_coef * (np.exp(d) - d - 1)
            if cfg.entropy_coef:
                loss -= cfg.entropy_coef * ent[b, t]
            tok[b, t] = loss
    rows = [b for b in range(B) if mask[b].sum() > 0]
    if cfg.aggregation == "per_sample":
        return np.mean([(tok[b] * mask[b]).sum() / mask[b].sum() for b in rows])
    if cfg.aggregation == "per_token":
        return (tok * mask).sum() / mask.sum()
    return (tok * mask).sum() / (len(rows) * (cfg.max_len or T))


def random_inputs(seed=0, B=6, T=7):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 0.5, size=(B, T))
    new = old + rng.normal(0, 0.4, size=(B, T))           # ratios spread well past both clips
    lengths = rng.integers(1, T + 1, size=B)
    lengths[2] = 0                                        # a padding row
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
    adv = rng.normal(size=B)
    return new, old, adv, mask, rng


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("extras", ["plain", "kl_entropy_dual", "token_adv"])
def test_loss_matches_numpy_reference(aggregation, extras):
    new, old, adv, mask, rng = random_inputs()
    cfg = GRPOConfig(aggregation=aggregation, max_len=9 if aggregation == "dr_grpo" else None)
    ref = ent = None
    if extras == "kl_entropy_dual":
        cfg = dataclasses.replace(cfg, kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
        ref, ent = old + rng.normal(0, 0.3, size=old.shape), rng.uniform(0, 2, size=old.shape)
    if extras == "token_adv":
        adv = rng.normal(size=mask.shape)
    f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
    loss, metrics = loss_jit(f32(new), f32(old), f32(adv), f32(mask), cfg, ref_logp=f32(ref), entropy=f32(ent))
    np.testing.assert_allclose(float(loss), numpy_loss(new, old, adv, mask, cfg, ref, ent), rtol=1e-5, atol=1e-6)
    ratio = np.exp(new - old)
    np.testing.assert_allclose(float(metrics["ratio_mean"]), (ratio * mask).sum() / mask.sum(), rtol=1e-5)
    k3 = ratio - 1 - (new - old)
    np.testing.assert_allclose(float(metrics["approx_kl"]), (k3 * mask).sum() / mask.sum(), rtol=1e-5)
    assert float(metrics["tokens"]) == mask.sum() and float(metrics["samples"]) == (mask.sum(1) > 0).sum()
    if extras == "plain":
        # (loss_sum, weight) of row splits add up to the whole batch's loss: what grad accumulation relies on.
        split = lambda x: f32(np.stack([x[i::3] for i in range(3)]))
        terms = jax.jit(jax.vmap(lambda *a: grpo.policy_loss_terms(*a, cfg)[:2]))
        loss_sums, weights = terms(split(new), split(old), split(adv), split(mask))
        assert float(loss_sums.sum() / weights.sum()) == pytest.approx(float(loss), rel=1e-5)


def test_clip_higher_is_asymmetric_and_on_the_advantage_side():
    cfg = GRPOConfig(eps_low=0.2, eps_high=0.28, aggregation="per_token")
    ratios = np.array([1.5, 1.25, 0.5, 0.75, 0.5, 1.5, 1.25, 0.75])
    adv = np.array([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
    # A > 0: clipped only above 1.28 (1.25 is inside clip-higher's range, 0.5 never clipped);
    # A < 0: clipped only below 0.8 (0.75 clipped, 1.5 never clipped).
    clipped = np.array([True, False, False, False, True, False, False, True])
    old = np.zeros((8, 1), np.float32)
    new = jnp.asarray(np.log(ratios)[:, None], jnp.float32)
    args = (jnp.asarray(old), jnp.asarray(adv, jnp.float32), jnp.ones((8, 1)))
    grads = np.asarray(grad_jit(new, *args, cfg))[:, 0]
    np.testing.assert_array_equal(grads == 0.0, clipped)
    np.testing.assert_allclose(grads[~clipped], (-adv * ratios / 8)[~clipped], rtol=1e-6)
    _, metrics = loss_jit(new, *args, cfg)
    assert float(metrics["clip_frac_high"]) == 1 / 8 and float(metrics["clip_frac_low"]) == 2 / 8
    symmetric = dataclasses.replace(cfg, eps_high=0.2)
    grads_sym = np.asarray(grad_jit(new, *args, symmetric))[:, 0]
    assert grads_sym[1] == 0.0 and grads[1] != 0.0       # ratio 1.25 with A > 0: clipped only at eps_high 0.2


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_gradient_matches_analytic(aggregation):
    new, old, adv, mask, rng = random_inputs(seed=1)
    ref = old + rng.normal(0, 0.3, size=old.shape)
    cfg = GRPOConfig(aggregation=aggregation, kl_coef=0.05)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    grad = grad_jit(f32(new), f32(old), f32(adv), f32(mask), cfg, ref_logp=f32(ref))
    r = np.exp(new - old)
    A = adv[:, None]
    clipped = ((A > 0) & (r > 1 + cfg.eps_high)) | ((A < 0) & (r < 1 - cfg.eps_low))
    d_tok = np.where(clipped, 0.0, -A * r) + cfg.kl_coef * (1 - np.exp(ref - new))
    rows, T = (mask.sum(1) > 0).sum(), mask.shape[1]
    norm = {"per_sample": rows * np.maximum(mask.sum(1, keepdims=True), 1), "per_token": mask.sum(),
            "dr_grpo": rows * T}[aggregation]
    np.testing.assert_allclose(grad, d_tok * mask / norm, rtol=1e-4, atol=1e-7)


def test_kl_off_needs_no_reference_and_errors_are_clear():
    new, old, adv, mask, _ = random_inputs()
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    loss, metrics = loss_jit(f32(new), f32(old), f32(adv), f32(mask), GRPOConfig())
    assert np.isfinite(float(loss)) and "kl_ref" not in metrics
    with pytest.raises(ValueError, match="ref_logp"):
        loss_jit(f32(new), f32(old), f32(adv), f32(mask), GRPOConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy"):
        loss_jit(f32(new), f32(old), f32(adv), f32(mask), GRPOConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match="advantages"):
        loss_jit(f32(new), f32(old), f32(adv[:3]), f32(mask), GRPOConfig())
    with pytest.raises(ValueError, match="old_logp"):
        loss_jit(f32(new), f32(old[:, :3]), f32(adv), f32(mask), GRPOConfig())
    with pytest.raises(ValueError, match="aggregation"):
        GRPOConfig(aggregation="mean")
    with pytest.raises(ValueError, match="eps_low"):
        GRPOConfig(eps_low=1.0)
    with pytest.raises(ValueError, match="num_minibatches"):
        GRPOConfig(num_minibatches=0)


# ------------------------------------------------------------------------------------------- the update

V, L, PROMPTS, G = 6, 3, 4, 8            # vocab, response length, prompts per batch, group size
GOAL = np.array([3, 5, 1, 4])            # prompt p is rewarded when >= 2 of its L response tokens are GOAL[p]


def table_logp(params, batch):
    """A tiny real policy: the logits of response position t are table[prompt token, t]."""
    logits = params["table"][batch["input_ids"][:, :1], jnp.arange(L + 1)[None]]     # [B, L + 1, V]
    return grpo.token_logprobs(logits, batch["targets"])


table_logp_jit = jax.jit(table_logp)


def expected_reward(table):
    q = np.asarray(jax.nn.softmax(table, axis=-1), np.float64)[np.arange(PROMPTS), :L, GOAL]   # [P, L] hit probs
    q0, q1, q2 = q.T
    at_least_two = q0 * q1 + q0 * q2 + q1 * q2 - 2 * q0 * q1 * q2
    return float(at_least_two.mean())


def rollout(params, seed):
    """G responses for each of the PROMPTS prompt tokens -> the update's batch (rows grouped by prompt)."""
    prompts = np.repeat(np.arange(PROMPTS), G)
    logits = np.asarray(params["table"], np.float64)[prompts, :L]                # [B, L, V]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    cdf = np.cumsum(probs / probs.sum(-1, keepdims=True), -1)
    u = np.random.default_rng(seed).random(cdf.shape[:-1] + (1,))
    response = np.minimum((u > cdf).sum(-1), V - 1)                             # inverse-CDF sampling
    seq = np.concatenate([prompts[:, None], response], 1)                       # [B, L + 1]
    rewards = ((response == GOAL[prompts][:, None]).sum(1) >= 2).astype(np.float32)
    batch = {"input_ids": seq, "targets": np.concatenate([seq[:, 1:], np.zeros((len(seq), 1), int)], 1),
             "response_mask": np.concatenate([np.ones((len(seq), L)), np.zeros((len(seq), 1))], 1).astype(np.float32)}
    batch["old_logp"] = np.asarray(table_logp_jit(params, batch))
    batch["advantages"] = np.asarray(grpo.group_advantages(rewards.reshape(PROMPTS, G))).reshape(-1)
    return {k: jnp.asarray(v) for k, v in batch.items()}, rewards


def make_state(table=None, lr=0.1):
    opt = build_optimizer(dict(lr=lr, total_steps=1000, clip_norm=1.0))
    table = jnp.zeros((PROMPTS, L + 1, V)) if table is None else jnp.array(table)    # a copy: the update donates
    return opt, train_state_from_params({"table": table}, opt, jax.random.PRNGKey(0))


def test_update_learns_a_bandit():
    """Stale old_logp from the rollout (off by 0.5) is replaced by recompute_old_logp: the first minibatch is
    exactly on-policy, the later ones are not, and the expected reward climbs."""
    cfg = GRPOConfig(num_minibatches=2, ppo_epochs=2, recompute_old_logp=True)
    opt, state = make_state()
    update = grpo.make_grpo_update(table_logp, opt, cfg)
    curve = [expected_reward(state.params["table"])]
    for iteration in range(10):
        batch, _ = rollout(state.params, iteration)
        state, metrics = update(state, dict(batch, old_logp=batch["old_logp"] - 0.5))
        curve.append(expected_reward(state.params["table"]))
        assert float(metrics["first/ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
        assert float(metrics["first/clip_frac"]) == 0.0
        assert float(metrics["per_update/approx_kl"][-1]) > 0.0
    assert int(state.step) == 10 * 4 and int(metrics["updates"]) == 4
    assert curve[0] == pytest.approx(3 * (1 / 6) ** 2 - 2 * (1 / 6) ** 3)
    assert curve[-1] > 0.5 and curve[-1] > curve[5] > curve[0], curve


def test_presplit_update_with_grad_accumulation_matches_a_direct_step():
    table = jnp.asarray(np.random.default_rng(3).normal(size=(PROMPTS, L + 1, V)), jnp.float32)
    batch, _ = rollout({"table": table}, 4)
    batch["old_logp"] = batch["old_logp"] + 0.3 * jnp.asarray(np.random.default_rng(5).normal(size=batch["old_logp"].shape))
    batch["response_mask"] = batch["response_mask"].at[::3, 1:].set(0.0)        # uneven response lengths
    cfg = GRPOConfig(aggregation="per_sample", shuffle=False)
    opt, state = make_state(table, lr=0.01)
    # Reference: one optimizer step on the gradient of grpo_loss over the whole batch, computed directly.
    loss_of = lambda params: grpo.grpo_loss(table_logp(params, batch), batch["old_logp"], batch["advantages"],
                                            batch["response_mask"], cfg)

    @jax.jit
    def reference(state):
        (loss, policy), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, _ = opt.tx.update(grads, state.opt_state, state.params)
        return loss, policy, optax.global_norm(grads), state.params["table"] + updates["table"]

    ref_loss, ref_policy, ref_grad_norm, ref_table = reference(state)
    # 4 micro-batches inside the one minibatch, given presplit ([1, 4, B/4, ...]; micro-batch i = rows i::4).
    micro = {k: np.stack([np.asarray(v)[i::4] for i in range(4)])[None] for k, v in batch.items()}
    opt, state = make_state(table, lr=0.01)
    update = grpo.make_grpo_update(table_logp, opt, dataclasses.replace(cfg, grad_accum_steps=4), presplit=True)
    new_state, metrics = update(state, micro)
    np.testing.assert_allclose(new_state.params["table"], ref_table, atol=2e-6)
    assert float(metrics["loss"]) == pytest.approx(float(ref_loss), rel=1e-5)
    for key in ("approx_kl", "clip_frac_low", "clip_frac_high", "ratio_mean"):
        assert float(metrics[key]) == pytest.approx(float(ref_policy[key]), rel=1e-5, abs=1e-7)
    assert float(metrics["grad_norm"]) == pytest.approx(float(ref_grad_norm), rel=1e-5)


def test_presplit_micro_batches_recompute_old_logp_and_take_reference_params():
    """[M, k, ...] batches (num_minibatches 2 x grad_accum_steps 2): recompute_old_logp and ref_params reach
    every micro-batch, so the update equals one given those log-probs."""
    rng = np.random.default_rng(7)
    table = jnp.asarray(rng.normal(size=(PROMPTS, L + 1, V)), jnp.float32)
    ref = {"table": table + 0.3 * jnp.asarray(rng.normal(size=table.shape), jnp.float32)}
    batch, _ = rollout({"table": table}, 6)
    split = lambda b: {k: np.stack([np.asarray(v)[i::4] for i in range(4)]).reshape((2, 2, -1) + v.shape[1:])
                       for k, v in b.items()}
    given = dict(batch, old_logp=table_logp_jit({"table": table}, batch), ref_logp=table_logp_jit(ref, batch))
    cfg = GRPOConfig(num_minibatches=2, grad_accum_steps=2, kl_coef=0.1, shuffle=False)
    opt, state = make_state(table, lr=0.01)
    expected, expected_metrics = grpo.make_grpo_update(table_logp, opt, cfg, presplit=True)(state, split(given))
    stale = dict(batch, old_logp=batch["old_logp"] - 0.5)
    opt, state = make_state(table, lr=0.01)
    update = grpo.make_grpo_update(table_logp, opt, dataclasses.replace(cfg, recompute_old_logp=True), presplit=True)
    got, metrics = update(state, split(stale), ref)
    np.testing.assert_allclose(got.params["table"], expected.params["table"], atol=1e-6)
    for key in ("loss", "kl_ref", "approx_kl", "ratio_mean"):
        assert float(metrics[key]) == pytest.approx(float(expected_metrics[key]), rel=1e-5, abs=1e-7), key
    assert float(metrics["kl_ref"]) > 0.0


def test_update_batch_errors():
    batch, _ = rollout({"table": jnp.zeros((PROMPTS, L + 1, V))}, 8)
    opt, state = make_state()
    update = grpo.make_grpo_update(table_logp, opt, GRPOConfig(num_minibatches=3), jit=False)
    with pytest.raises(ValueError, match="divisible by num_minibatches"):
        update(state, batch)
    update = grpo.make_grpo_update(table_logp, opt, GRPOConfig(num_minibatches=2), jit=False)
    with pytest.raises(ValueError, match="lacks"):
        update(state, {k: v for k, v in batch.items() if k != "advantages"})
    with pytest.raises(ValueError, match="presplit=True"):
        update(state, dict(batch, pixel_values=jnp.zeros((5, 12))))
    with pytest.raises(ValueError, match="leading axis"):
        grpo.make_grpo_update(table_logp, opt, GRPOConfig(num_minibatches=2), presplit=True, jit=False)(state, batch)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.make_grpo_update(table_logp, opt, GRPOConfig(kl_coef=0.1), jit=False)(state, batch)
