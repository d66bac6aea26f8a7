"""The real GLM-V train step on simulated meshes equals the single-device step (issue #7).

The step is the one the supervised stages build (train/supervised.py: `stage_loss_fn`, `make_bias_rule`,
`experiment.param_shardings`, `state.state_shardings`, `step.make_train_step`), on the sft stage's tiny
model fed a packed batch from the data pipeline (8 rows, images in the batch). After one AdamW step the
loss, the gradient norm, the gradients (read back from Adam's first moment: after one update
mu = (1 - b1) * clipped gradient) and the new params of each mesh equal the single-device result:
dense on (fsdp 8), (data 2 x fsdp 4), (data 2 x fsdp 2 x tensor 2); MoE on (fsdp 2 x expert 4), whose
routed-token counts must match exactly.

Tolerance: weights are drawn at 0.3x the O(1) scale (kernels N(0, 0.09 / fan_in)). At full O(1) scale the
vision tower's gradients are ill-conditioned in fp32: perturbing the params by 1e-7 relative noise moves
them by 1.5e-3 (rel. L2) on one device, and the single-device fp32 gradients are themselves 1.3e-3 away
from a float64 run, so no mesh can agree better than that. At 0.3x the same perturbation moves them by
< 1e-5; the sharded gradients then agree to <= 2.2e-6 of each leaf's largest entry, and RTOL_GRAD sits
an order of magnitude above that. Params after the step get the same bound carried through AdamW's first
update (`adamw_slack`): entries whose gradient is fp32 noise near Adam's eps may differ by up to
2 lr (seen: a 1.6e-8 vs 1.8e-8 gradient entry moved its param by 0.61 vs 0.64 lr), so the test also
asserts that entries allowed more than 0.1 lr are under 1% of the trained entries.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from experiments.configs import sft
from glmv_jax.data.pipeline import make_pipeline
from glmv_jax.models.glmv import init_params
from glmv_jax.sharding.mesh import make_mesh
from glmv_jax.train.experiment import param_shardings, setup
from glmv_jax.train.optimizer import build_optimizer
from glmv_jax.train.state import state_shardings, train_state_from_params
from glmv_jax.sharding.global_batch import batch_shardings
from glmv_jax.train.step import make_train_step
from glmv_jax.train.supervised import make_bias_rule, stage_loss_fn

# Same math, compiles ~3x faster than the defaults on this CPU (the legacy elemental emitters, no expensive
# LLVM passes): 3.5 s instead of 9.7 s of CPU for the tiny dense step.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False,
                    "xla_llvm_disable_expensive_passes": True}
DATA = dict(seq_len=128, batch_size=8, patch_budget=1024, image_size=32, num_records=8)
OPTIMIZER = dict(lr=1e-3, warmup_steps=0, total_steps=100, final_lr_fraction=1.0, weight_decay=0.01, b1=0.9,
                 eps=1e-8)
WEIGHT_SCALE = 0.3
RTOL_GRAD = 2e-5     # of each leaf's largest |gradient| (measured: <= 2.2e-6 on every mesh)
RTOL_PARAM = 1e-6    # of each leaf's largest |param|, plus the AdamW slack of `adamw_slack`
MESHES = {
    "fsdp8": ("tiny", {"fsdp": 8}),
    "dp2_fsdp4": ("tiny", {"data": 2, "fsdp": 4}),
    "dp2_fsdp2_tp2": ("tiny", {"data": 2, "fsdp": 2, "tensor": 2}),
    "moe_fsdp2_ep4": ("tiny_moe", {"fsdp": 2, "expert": 4}),
}


# ------------------------------------------------------------------------------------------ setup

@functools.lru_cache(maxsize=None)
def experiment(preset: str, workdir: str):
    """The sft stage of `preset` (vision depth 1 for compile time) on one device, and its first packed batch."""
    cfg = sft.get_config(f"model={preset}")
    cfg.data.update(DATA)
    cfg.optimizer.update(OPTIMIZER)
    cfg.model.vision = {"depth": 1}
    cfg.mesh.ici, cfg.mesh.devices = {"data": 1}, 1
    exp = setup(cfg, workdir)
    batch = next(make_pipeline(exp.cfg.data, exp.tokenizer, exp.processor, seed=exp.cfg.seed))
    return exp, batch


def scaled_params(exp, seed: int = 0) -> dict:
    """Numpy params: norm scales 1, other vectors and embeddings N(0, s^2), kernels N(0, s^2 / fan_in)."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: init_params(exp.model_config, jax.random.key(0)))

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(leaf.shape, np.float32)
        std = 1.0 if "embedding" in name or len(leaf.shape) < 2 else leaf.shape[-2] ** -0.5
        return (WEIGHT_SCALE * std * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def stage_step(exp, optimizer, st_shardings=None, layout=None):
    """make_train_step exactly as run_supervised builds it (k = 1), plus the batch layout."""
    return make_train_step(stage_loss_fn(exp),
                           optimizer, nonfinite=exp.cfg.train.nonfinite, state_shardings=st_shardings,
                           batch_shardings=layout, rules=exp.rules, compiler_options=COMPILER_OPTIONS,
                           post_update=make_bias_rule(exp, exp.cfg.train.get("moe_bias_rate", 1e-3)))


def adam_moments(opt_state):
    """(mu, nu) trees of the optimizer's AdamW state."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    assert len(found) == 1, f"expected one Adam state, found {len(found)}"
    return found[0].mu, found[0].nu


def one_step(exp, batch, mesh=None):
    """(state after one step, metrics, state shardings or None) on `mesh` (None: one device)."""
    optimizer = build_optimizer(exp.cfg.optimizer)
    params = scaled_params(exp)
    if mesh is None:
        state = train_state_from_params(params, optimizer, jax.random.key(0))
        return (*stage_step(exp, optimizer)(state, batch), None)
    exp = dataclasses.replace(exp, mesh=mesh)
    abstract, shardings = param_shardings(exp)
    st_shardings = state_shardings(optimizer, abstract, shardings, mesh)
    step = stage_step(exp, optimizer, st_shardings, batch_shardings(batch, mesh, exp.rules))
    state = train_state_from_params(params, optimizer, jax.random.key(0), st_shardings)
    new_state, metrics = step(state, batch)
    return new_state, metrics, st_shardings


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sharded_step"))


@pytest.fixture(scope="module")
def single(workdir):
    """Single-device results per preset, computed once."""
    cache = {}

    def get(preset):
        if preset not in cache:
            exp, batch = experiment(preset, f"{workdir}/{preset}")
            state, metrics, _ = one_step(exp, batch)
            cache[preset] = (*jax.device_get((state, metrics)), scaled_params(exp))
        return cache[preset]
    return get


@pytest.fixture(scope="module")
def sharded(workdir):
    """Per mesh name: (state, metrics, state shardings, batch), computed once."""
    cache = {}

    def get(name):
        if name not in cache:
            preset, ici = MESHES[name]
            exp, batch = experiment(preset, f"{workdir}/{preset}")
            cache[name] = (*one_step(exp, batch, make_mesh(ici)), batch)
        return cache[name]
    return get


# ------------------------------------------------------------------------------------------ checks

def assert_leafwise_close(actual, expected, rtol: float, what: str):
    """Every leaf within rtol x (its largest |entry|); the message names the leaf."""
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
        a, b = np.asarray(a), np.asarray(b)
        scale = float(np.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale + 1e-30,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)} (largest |entry| {scale:.3g})")


def adamw_slack(grad: np.ndarray, other_grad: np.ndarray) -> np.ndarray:
    """Per-entry bound on |param difference| after one AdamW step when the gradients differ by at most
    tol_g = RTOL_GRAD x max|g|: the first step moves a param by lr * g / (|g| + eps) (+ weight decay,
    identical on both sides), whose slope in g is eps / (|g| + eps)^2, so an entry whose gradient is fp32
    noise near Adam's eps may move by anything up to 2 lr. Entries with a zero gradient on both sides
    (embedding rows of absent tokens) get no slack: their update is the weight decay alone."""
    lr, eps = OPTIMIZER["lr"], OPTIMIZER["eps"]
    tol_g = RTOL_GRAD * float(np.abs(grad).max())
    slack = lr * np.minimum(2.0, tol_g * eps / (np.maximum(np.abs(grad) - tol_g, 0.0) + eps) ** 2)
    return np.where((grad == 0) & (other_grad == 0), 0.0, slack)


def test_batch_has_images_and_fills_every_row(workdir):
    for preset in ("tiny", "tiny_moe"):
        _, batch = experiment(preset, f"{workdir}/{preset}")
        assert batch["input_ids"].shape == (8, 128) and batch["pixel_values"].shape[0] == 1024
        assert (batch["patch_segment"] > 0).sum() >= 512 and batch["patch_segment"].max() >= 8
        assert ((batch["segment_ids"] > 0).sum(axis=1) > 0).all()           # every data shard has tokens
        assert (batch["loss_mask"].sum(axis=1) > 0).all()


@pytest.mark.parametrize("name", list(MESHES))
def test_step_equals_single_device(name, single, sharded):
    state, metrics, _, _ = sharded(name)
    ref_state, ref_metrics, initial = single(MESHES[name][0])
    state, metrics = jax.device_get((state, metrics))
    assert int(metrics["nonfinite"]) == 0 and int(ref_metrics["nonfinite"]) == 0
    assert float(metrics["tokens"]) == float(ref_metrics["tokens"]) > 0
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(ref_metrics["grad_norm"]), rtol=1e-5)
    assert float(ref_metrics["grad_norm"]) > 0
    mu, nu = adam_moments(state.opt_state)
    ref_mu, ref_nu = adam_moments(ref_state.opt_state)
    assert_leafwise_close(mu, ref_mu, RTOL_GRAD, "gradient (Adam mu = (1 - b1) g)")
    assert_leafwise_close(nu, ref_nu, 2 * RTOL_GRAD, "squared gradient (Adam nu = (1 - b2) g^2)")
    named = lambda tree: {jax.tree_util.keystr(k): np.asarray(v) / (1 - OPTIMIZER["b1"])
                          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    grads, ref_grads = named(mu), named(ref_mu)
    loose = total = 0
    for (path, p), ref_p in zip(jax.tree_util.tree_flatten_with_path(state.params)[0],
                                jax.tree.leaves(ref_state.params)):
        key, ref_p = jax.tree_util.keystr(path), np.asarray(ref_p)
        if key in ref_grads:
            slack = adamw_slack(ref_grads[key], grads[key])
            loose, total = loose + int(np.sum(slack > 0.1 * OPTIMIZER["lr"])), total + slack.size
        else:                                 # not trained by AdamW (the MoE router's correction bias)
            slack = 0.0
        atol = RTOL_PARAM * float(np.abs(ref_p).max()) + slack
        np.testing.assert_array_less(np.abs(np.asarray(p) - ref_p), atol + 1e-30,
                                     err_msg=f"params after one AdamW step {key}")
    # Not vacuous: Adam's eps slack covers few entries (k-bias dims outside the rotary half, whose
    # gradient is exactly 0 in exact arithmetic, are among them).
    assert loose < 0.01 * total, f"AdamW slack > 0.1 lr on {loose} of {total} trained entries"
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), ref_state.params, initial))
    assert sum(m > 0.5 * OPTIMIZER["lr"] for m in moved) > 0.8 * len(moved)   # the update really happened
    if "moe_load_sum" in ref_metrics:         # routed-token counts per (layer, expert): integers, exact
        np.testing.assert_array_equal(metrics["moe_load_sum"], ref_metrics["moe_load_sum"])
        assert float(np.sum(ref_metrics["moe_load_sum"])) > 0


# Expected addressable shard shapes, worked out by hand from sharding/rules.py DEFAULT for the tiny configs
# (vocab 512, D 64, 4 heads of 16, F 96, 2 layers; ViT width 32; MoE: 8 experts of width 32, 2 MoE layers).
SHARD_SHAPES = {
    "fsdp8": {("text", "embed", "embedding"): (512, 8), ("text", "layers", "attn", "q", "kernel"): (2, 8, 4, 16),
              ("text", "layers", "mlp", "up", "kernel"): (2, 8, 96), ("lm_head", "kernel"): (8, 512),
              ("vision", "blocks", "attn", "qkv", "kernel"): (1, 4, 3, 2, 16)},
    "dp2_fsdp4": {("text", "embed", "embedding"): (512, 16), ("text", "layers", "attn", "q", "kernel"): (2, 16, 4, 16),
                  ("lm_head", "kernel"): (16, 512), ("vision", "patch_embed", "kernel"): (96, 8)},
    "dp2_fsdp2_tp2": {("text", "embed", "embedding"): (256, 32),
                      ("text", "layers", "attn", "q", "kernel"): (2, 32, 2, 16),
                      ("text", "layers", "attn", "k", "kernel"): (2, 32, 1, 16),
                      ("text", "layers", "mlp", "up", "kernel"): (2, 32, 48), ("lm_head", "kernel"): (32, 256),
                      ("vision", "blocks", "attn", "qkv", "kernel"): (1, 16, 3, 1, 16)},
    "moe_fsdp2_ep4": {("text", "embed", "embedding"): (512, 32),
                      ("text", "moe_layers", "moe", "experts", "gate"): (2, 2, 32, 32),
                      ("text", "moe_layers", "moe", "experts", "down"): (2, 2, 32, 32),
                      ("text", "moe_layers", "moe", "router", "kernel"): (2, 32, 8)},
}
ROWS_PER_DEVICE = {"fsdp8": 1, "dp2_fsdp4": 1, "dp2_fsdp2_tp2": 2, "moe_fsdp2_ep4": 1}


def leaf(tree, path):
    return functools.reduce(lambda node, key: node[key], path, tree)


@pytest.mark.parametrize("name", list(MESHES))
def test_state_and_batch_are_sharded_as_the_rules_say(name, sharded):
    state, _, st_shardings, batch = sharded(name)
    mu, _ = adam_moments(state.opt_state)
    for path, shape in SHARD_SHAPES[name].items():
        param = leaf(state.params, path)
        assert {s.data.shape for s in param.addressable_shards} == {shape}, (path, param.sharding)
        assert param.sharding.is_equivalent_to(leaf(st_shardings.params, path), param.ndim)
        assert {s.data.shape for s in leaf(mu, path).addressable_shards} == {shape}, path   # moments follow
    assert state.step.sharding.is_fully_replicated
    layout = batch_shardings(batch, state.step.sharding.mesh)
    rows = {jax.device_put(batch["input_ids"], layout["input_ids"]).addressable_shards[i].data.shape[0]
            for i in range(8)}
    assert rows == {ROWS_PER_DEVICE[name]}
