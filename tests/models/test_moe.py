"""MoE layer: parity with HF Glm4vMoeTextMoE, dropless grouped == dense reference (values and gradients,
experts without tokens included), load-balancing helpers, the NNX holder, and input errors. CPU fp32."""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from glmv_jax.config import tiny, to_hf_config
from glmv_jax.models import moe, moe_balance
from glmv_jax.models.moe_parallel import ExpertParallel

BASE = tiny(moe=True).text                                            # E=8, K=2, n_group=2, topk_group=1
WIDE = replace(BASE, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
               routed_scaling_factor=2.5)
UNNORMED = replace(BASE, norm_topk_prob=False, routed_scaling_factor=1.5, n_group=1, topk_group=1)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def random_params(cfg, seed=0, bias_scale=0.3):
    """One layer's params at O(1) scale in our layout (numpy fp32)."""
    rng = np.random.default_rng(seed)
    d, e, f = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    fs = f * cfg.n_shared_experts
    n = lambda *s, fan: (rng.standard_normal(s) * 1.5 / np.sqrt(fan)).astype(np.float32)
    return {"router": {"kernel": n(d, e, fan=d), "correction_bias": (bias_scale * rng.standard_normal(e)).astype(np.float32)},
            "experts": {"gate": n(e, d, f, fan=d), "up": n(e, d, f, fan=d), "down": n(e, f, d, fan=f)},
            "shared": {"gate": {"kernel": n(d, fs, fan=d)}, "up": {"kernel": n(d, fs, fan=d)},
                       "down": {"kernel": n(fs, d, fan=fs)}}}


def hf_block(cfg, params):
    """transformers' Glm4vMoeTextMoE with our params copied into HF's in-memory layout."""
    from transformers.models.glm4v_moe.configuration_glm4v_moe import Glm4vMoeTextConfig
    from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeTextMoE
    text = dict(to_hf_config(tiny(moe=True).replace(text=cfg))["text_config"])
    block = Glm4vMoeTextMoE(Glm4vMoeTextConfig(**text)).eval()
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    ex, sh = params["experts"], params["shared"]
    with torch.no_grad():
        block.gate.weight.copy_(t(params["router"]["kernel"].T))
        block.gate.e_score_correction_bias.copy_(t(params["router"]["correction_bias"]))
        block.experts.gate_up_proj.copy_(t(np.concatenate([ex["gate"], ex["up"]], axis=2).transpose(0, 2, 1)))
        block.experts.down_proj.copy_(t(ex["down"].transpose(0, 2, 1)))
        for name in ("gate", "up", "down"):
            getattr(block.shared_experts, f"{name}_proj").weight.copy_(t(sh[name]["kernel"].T))
    return block


# ----------------------------------------------------------------------------------------------
# HF parity

@pytest.mark.parametrize("cfg", [BASE, WIDE, UNNORMED], ids=["E8k2_g2t1", "E16k4_g4t2_scale2.5", "unnormed"])
def test_matches_hf(cfg):
    params = random_params(cfg, seed=1)
    x = np.random.default_rng(2).standard_normal((3, 11, cfg.hidden_size)).astype(np.float32)
    block = hf_block(cfg, params)
    with torch.no_grad():
        y_hf = block(torch.from_numpy(x)).numpy()
        _, w_hf, idx_hf = block.gate(torch.from_numpy(x))
    routing = moe.route(jnp.asarray(x.reshape(-1, cfg.hidden_size)), params["router"]["kernel"],
                        params["router"]["correction_bias"], cfg)
    np.testing.assert_array_equal(np.sort(np.asarray(routing.experts), 1), np.sort(idx_hf.numpy(), 1))
    order = lambda i: np.argsort(i, axis=1)
    w_ours = np.take_along_axis(np.asarray(routing.weights), order(np.asarray(routing.experts)), 1)
    w_ref = np.take_along_axis(w_hf.numpy(), order(idx_hf.numpy()), 1)
    assert rel_err(w_ours, w_ref) <= 1e-6
    more = (moe.MoEOptions(dispatch="dense"), moe.MoEOptions(gmm="ragged_dot")) if cfg is WIDE else ()
    for options in (moe.MoEOptions(),) + more:
        y, aux = jax.jit(lambda p, v: moe.moe_layer(p, v, cfg, options=options))(params, x)
        assert y.shape == x.shape and y.dtype == jnp.float32
        assert rel_err(y, y_hf) <= 1e-5, options
        assert int(aux["load"].sum()) == x.shape[0] * x.shape[1] * cfg.num_experts_per_tok
        assert int(aux["dropped"]) == 0


def test_group_limit_is_active():
    """With n_group=4, topk_group=2 every token's experts lie in at most 2 groups, and the bias changes the
    selection (so the test above really exercises both)."""
    params = random_params(WIDE, seed=3, bias_scale=0.5)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((64, WIDE.hidden_size)), jnp.float32)
    r = moe.route(x, params["router"]["kernel"], params["router"]["correction_bias"], WIDE)
    groups = np.asarray(r.experts) // (WIDE.n_routed_experts // WIDE.n_group)
    assert max(len(set(row)) for row in groups) <= WIDE.topk_group
    no_bias = moe.route(x, params["router"]["kernel"], np.zeros_like(params["router"]["correction_bias"]), WIDE)
    assert (np.sort(np.asarray(no_bias.experts), 1) != np.sort(np.asarray(r.experts), 1)).any()
    ungrouped = moe.route(x, params["router"]["kernel"], params["router"]["correction_bias"],
                          replace(WIDE, n_group=1, topk_group=1))
    assert (np.sort(np.asarray(ungrouped.experts), 1) != np.sort(np.asarray(r.experts), 1)).any()


def test_hf_switch_loss_parity():
    """hf_load_balancing_loss over two layers with padding equals transformers' load_balancing_loss_func."""
    from transformers.models.glm4v_moe.modeling_glm4v_moe import load_balancing_loss_func
    rng = np.random.default_rng(5)
    b, t, e, k = 2, 7, BASE.n_routed_experts, BASE.num_experts_per_tok
    logits = [rng.standard_normal((b * t, e)).astype(np.float32) for _ in range(2)]
    mask = np.ones((b, t), np.int64)
    mask[1, 5:] = 0
    want = load_balancing_loss_func(tuple(torch.from_numpy(l) for l in logits), e, k, torch.from_numpy(mask))
    stats = [moe_balance.routing_stats(jnp.asarray(l), jax.nn.sigmoid(jnp.asarray(l)),
                                       jax.lax.top_k(jnp.asarray(l), k)[1], k, b, jnp.asarray(mask))
             for l in logits]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *stats)
    assert abs(float(moe_balance.hf_load_balancing_loss(stacked)) - float(want)) <= 1e-6 * abs(float(want))


# ----------------------------------------------------------------------------------------------
# Dropless grouped == dense reference (values and gradients)

def _loss_fn(cfg, options):
    def loss(p, x):
        y, aux = moe.moe_layer(p, x, cfg, options=options)
        return jnp.sum(jnp.sin(y) * y), (y, aux)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


@pytest.fixture(scope="module")
def starved():
    """WIDE params where experts 3 and 9 can never win: they must get no tokens."""
    params = random_params(WIDE, seed=6)
    params["router"]["kernel"][:, [3, 9]] = 0.0
    params["router"]["correction_bias"][[3, 9]] = -10.0
    x = np.random.default_rng(7).standard_normal((2, 24, WIDE.hidden_size)).astype(np.float32)
    (_, (y, aux)), grads = _loss_fn(WIDE, moe.MoEOptions(dispatch="dense"))(params, x)
    return params, x, y, aux, grads


@pytest.mark.parametrize("options", [moe.MoEOptions(gmm="tiled", tile=8), moe.MoEOptions(gmm="tiled", tile=1),
                                     moe.MoEOptions(gmm="ragged_dot")], ids=["tiled8", "tiled1", "ragged_dot"])
def test_sorted_matches_dense(starved, options):
    params, x, y_ref, aux_ref, (gp_ref, gx_ref) = starved
    assert int(aux_ref["load"][3]) == 0 and int(aux_ref["load"][9]) == 0
    (_, (y, aux)), (gp, gx) = _loss_fn(WIDE, options)(params, x)
    assert rel_err(y, y_ref) <= 1e-5
    np.testing.assert_array_equal(aux["load"], aux_ref["load"])
    assert rel_err(gx, gx_ref) <= 1e-5
    for path, g in jax.tree_util.tree_flatten_with_path(gp)[0]:
        ref = gp_ref
        for key in path:
            ref = ref[key.key]
        name = jax.tree_util.keystr(path)
        if "correction_bias" in name:
            assert not np.asarray(g).any(), "the correction bias only selects: no gradient"
            continue
        assert rel_err(g, ref) <= 1e-5, name
    used = np.asarray(aux_ref["load"]) > 0
    for name in ("gate", "up", "down"):
        np.testing.assert_array_equal(np.abs(np.asarray(gp["experts"][name])).sum(axis=(1, 2)) > 0, used)


def test_single_token_buffer_bound():
    """One token (decode): the padded buffer is sized by the K copies, not by E groups; still exact."""
    params = random_params(WIDE, seed=15)
    x = np.random.default_rng(16).standard_normal((1, 1, WIDE.hidden_size)).astype(np.float32)
    y, _ = moe.moe_layer(params, x, WIDE, options=moe.MoEOptions(gmm="tiled", tile=8))
    y_ref, _ = moe.moe_layer(params, x, WIDE, options=moe.MoEOptions(dispatch="dense"))
    assert rel_err(y, y_ref) <= 1e-5


def test_gmm_impl_switch():
    from glmv_jax.models.moe_gmm import resolve_gmm_impl
    assert resolve_gmm_impl("megablox") == "ragged_dot"          # no Pallas kernel wired: the TPU switch maps here
    assert resolve_gmm_impl("auto") == "tiled"                   # these tests run on CPU
    with pytest.raises(ValueError, match="unknown grouped-matmul impl"):
        resolve_gmm_impl("triton")


def test_tiled_gmm_direct_grad():
    """The custom VJP of the tiled grouped matmul against autodiff of a dense per-row product, with an
    empty group in the middle and unused tiles at the end."""
    from glmv_jax.models.moe_gmm import grouped_ffn
    rng = np.random.default_rng(8)
    g, d, f, rows = 4, 8, 6, 20
    w = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((g, d, f), (g, d, f), (g, f, d))]
    x = jnp.asarray(rng.standard_normal((rows, d)), jnp.float32)
    group = jnp.asarray(rng.choice([0, 1, 3, 4], size=rows), jnp.int32)         # 2 empty; 4 = "not here"

    def ref(x, gate, up, down):
        one = lambda xi, gi: jnp.where(gi < g, (jax.nn.silu(xi @ gate[gi % g]) * (xi @ up[gi % g])) @ down[gi % g], 0)
        return jax.vmap(one)(x, group)

    def ours(x, gate, up, down):
        return grouped_ffn(x, jnp.arange(rows), group, gate, up, down, max_rows=rows, impl="tiled", tile=4)

    value_and_grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.cos(fn(*a))), argnums=(0, 1, 2, 3)))
    (lr, gr), (lo, go) = value_and_grad(ref)(x, *w), value_and_grad(ours)(x, *w)
    assert abs(float(lo) - float(lr)) <= 1e-5 * abs(float(lr))
    for a, b in zip(go, gr):
        assert rel_err(a, b) <= 1e-5
    assert not np.asarray(go[1][2]).any()


# ----------------------------------------------------------------------------------------------
# Load balancing

def test_bias_update_balances_a_skewed_router():
    cfg = replace(BASE, n_group=1, topk_group=1)
    params = random_params(cfg, seed=9, bias_scale=0.0)
    rng = np.random.default_rng(10)
    x = rng.standard_normal((512, cfg.hidden_size)).astype(np.float32)
    x[:, 0] = 1.0
    params["router"]["kernel"][0, :] = np.linspace(3.0, -3.0, cfg.n_routed_experts)      # expert 0 favoured
    kernel, x = jnp.asarray(params["router"]["kernel"]), jnp.asarray(x)

    def load(bias):
        r = moe.route(x, kernel, bias, cfg)
        return jnp.zeros((cfg.n_routed_experts,), jnp.int32).at[r.experts].add(1)

    def step(bias, _):
        return moe_balance.update_correction_bias(bias, load(bias)), None

    bias0 = jnp.zeros((cfg.n_routed_experts,), jnp.float32)
    bias, _ = jax.jit(lambda b: jax.lax.scan(step, b, None, length=1500))(bias0)
    before, after = float(moe_balance.load_imbalance(load(bias0))), float(moe_balance.load_imbalance(load(bias)))
    assert before > 2.5, before
    assert after < 1.25, (before, after)
    assert float(bias[0]) < 0 < float(bias[-1])
    stacked = moe_balance.update_correction_bias(jnp.zeros((2, 4)), jnp.asarray([[4, 0, 0, 0], [1, 1, 1, 1]]))
    np.testing.assert_allclose(stacked, [[-1e-3, 1e-3, 1e-3, 1e-3], [0, 0, 0, 0]])


def test_sequence_aux_loss_against_numpy():
    rng = np.random.default_rng(11)
    b, t, e, k = 3, 5, 8, 2
    scores = rng.uniform(0.05, 0.95, (b * t, e)).astype(np.float32)
    experts = np.stack([rng.choice(e, k, replace=False) for _ in range(b * t)])
    mask = np.ones((b, t), np.float32)
    mask[2, 3:] = 0
    want = []
    for s in range(b):
        rows = [s * t + i for i in range(t) if mask[s, i]]
        f = np.zeros(e)
        for r in rows:
            f[experts[r]] += 1
        f *= e / (k * len(rows))
        p = np.mean([scores[r] / scores[r].sum() for r in rows], axis=0)
        want.append((f * p).sum())
    got = moe_balance.sequence_aux_loss(jnp.asarray(scores), jnp.asarray(experts), b, jnp.asarray(mask))
    assert abs(float(got) - np.mean(want)) <= 1e-6
    uniform = moe_balance.sequence_aux_loss(jnp.full((4, 4), 0.5), jnp.asarray([[0], [1], [2], [3]]), 1)
    assert abs(float(uniform) - 1.0) <= 1e-6


def test_aux_respects_mask():
    params = random_params(BASE, seed=12)
    x = np.random.default_rng(13).standard_normal((2, 6, BASE.hidden_size)).astype(np.float32)
    mask = np.ones((2, 6), bool)
    mask[1, 2:] = False
    _, aux = moe.moe_layer(params, x, BASE, mask=mask)
    assert int(aux["load"].sum()) == mask.sum() * BASE.num_experts_per_tok
    assert float(aux["lb_rows"]) == mask.sum()


# ----------------------------------------------------------------------------------------------
# NNX holder and errors

def test_nnx_module_tree_and_call():
    layer = moe.MoE(BASE, rngs=nnx.Rngs(0))
    state = nnx.to_pure_dict(nnx.state(layer))
    shapes = jax.tree.map(lambda a: tuple(a.shape), state)
    d, e, f = BASE.hidden_size, BASE.n_routed_experts, BASE.moe_intermediate_size
    assert shapes == {"router": {"kernel": (d, e), "correction_bias": (e,)},
                      "experts": {"gate": (e, d, f), "up": (e, d, f), "down": (e, f, d)},
                      "shared": {"gate": {"kernel": (d, f)}, "up": {"kernel": (d, f)}, "down": {"kernel": (f, d)}}}
    assert isinstance(layer.router.correction_bias, moe.RouterBias)
    assert not isinstance(layer.router.correction_bias, nnx.Param)
    assert layer.router.kernel.get_metadata()["out_sharding"] == ("embed", None)
    assert layer.experts.down.get_metadata()["out_sharding"] == ("exp", "moe_mlp", "moe_embed")
    assert set(nnx.to_pure_dict(nnx.state(layer, nnx.Param))) == {"router", "experts", "shared"}
    x = jnp.asarray(np.random.default_rng(14).standard_normal((2, 5, d)), jnp.float32)
    y, _ = layer(x)
    y_ref, _ = moe.moe_layer(state, x, BASE)
    np.testing.assert_array_equal(y, y_ref)


def test_bad_inputs_raise():
    params = random_params(BASE)
    x = np.zeros((4, BASE.hidden_size), np.float32)
    with pytest.raises(ValueError, match="MoE input must be"):
        moe.moe_layer(params, np.zeros((4, 3), np.float32), BASE)
    broken = {**params, "experts": {k: v for k, v in params["experts"].items() if k != "up"}}
    with pytest.raises(ValueError, match="experts/up"):
        moe.moe_layer(broken, x, BASE)
    with pytest.raises(ValueError, match="router/kernel has shape"):
        moe.moe_layer({**params, "router": {**params["router"], "kernel": params["router"]["kernel"].T}}, x, BASE)
    with pytest.raises(ValueError, match="unknown MoE dispatch"):
        moe.moe_layer(params, x, BASE, options=moe.MoEOptions(dispatch="loop"))
    with pytest.raises(ValueError, match="unknown grouped-matmul impl"):
        moe.moe_layer(params, x, BASE, options=moe.MoEOptions(gmm="cutlass"))
    with pytest.raises(ValueError, match="needs a MoE text config"):
        moe.moe_layer(params, x, replace(BASE, moe=False))
    with pytest.raises(ValueError, match="top-2 experts"):
        moe.moe_layer(params, x, replace(BASE, n_group=8, topk_group=1, num_experts_per_tok=1))
    auto = (jax.sharding.AxisType.Auto,)
    mesh3 = jax.make_mesh((3,), ("expert",), axis_types=auto, devices=jax.devices()[:3])
    with pytest.raises(ValueError, match="do not split over expert axis"):
        moe.moe_layer(params, np.zeros((12, BASE.hidden_size), np.float32), BASE,
                      options=moe.MoEOptions(parallel=ExpertParallel(mesh3)))
    mesh = jax.make_mesh((8,), ("expert",), axis_types=auto)
    with pytest.raises(ValueError, match="tokens do not split"):
        moe.moe_layer(params, np.zeros((12, BASE.hidden_size), np.float32), BASE,
                      options=moe.MoEOptions(parallel=ExpertParallel(mesh)))
    with pytest.raises(ValueError, match="unknown expert-parallel strategy"):
        moe.moe_layer(params, np.zeros((16, BASE.hidden_size), np.float32), BASE,
                      options=moe.MoEOptions(parallel=ExpertParallel(mesh, strategy="ring")))
    with pytest.raises(ValueError, match="not a mesh axis"):
        moe.moe_layer(params, np.zeros((16, BASE.hidden_size), np.float32), BASE,
                      options=moe.MoEOptions(parallel=ExpertParallel(mesh, tensor_axis="tensor")))
    with pytest.raises(ValueError, match="bias shape"):
        moe_balance.update_correction_bias(jnp.zeros(4), jnp.zeros(5))

