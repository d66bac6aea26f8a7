"""Sharded state and step on 8 simulated CPU devices; checkpoints restored onto a different mesh."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from glmv_jax.sharding.mesh import make_mesh
from glmv_jax.sharding.rules import DEFAULT, logical_to_spec
from glmv_jax.train.checkpoint import Checkpointer
from glmv_jax.train.state import (abstract_train_state, init_train_state, param_shardings_from_logical,
                                  state_shardings, train_state_from_params)
from glmv_jax.sharding.global_batch import batch_shardings
from glmv_jax.train.step import make_train_step
from tests.train import toy

ROWS = 16


def shape_tree(params):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)


def shardings_for(mesh, opt):
    abstract = shape_tree(toy.init_params())
    return state_shardings(opt, abstract, param_shardings_from_logical(toy.LOGICAL_AXES, abstract, mesh, DEFAULT), mesh)


@pytest.fixture(scope="module")
def setup():
    opt = toy.optimizer()
    mesh = make_mesh({"fsdp": 8})
    return opt, mesh, shardings_for(mesh, opt)


def test_state_is_born_sharded(setup):
    opt, mesh, shardings = setup
    params = toy.init_params()
    state = init_train_state(lambda rng: params, opt, jax.random.PRNGKey(0), shardings)
    kernel = state.params["text"]["layers"]["mlp"]["up"]["kernel"]           # (layers, embed, mlp)
    expected = logical_to_spec(("layers", "embed", "mlp"), kernel.shape, mesh, DEFAULT)
    assert expected == P(None, "fsdp", None)
    assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, expected), kernel.ndim)
    assert kernel.addressable_shards[0].data.shape == (toy.L, toy.D // 8, toy.H)
    adam = state.opt_state.inner_states["train"].inner_state[1][0]
    mu = adam.mu["text"]["layers"]["mlp"]["up"]["kernel"]
    assert mu.sharding.is_equivalent_to(kernel.sharding, mu.ndim)
    assert adam.count.sharding.is_fully_replicated and state.step.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(kernel), params["text"]["layers"]["mlp"]["up"]["kernel"])


def test_sharded_accumulating_step_matches_single_device(setup, tmp_path):
    """k=2 on the fsdp-8 mesh == k=1 on one device; then the checkpoint restores onto data 2 x fsdp 4."""
    opt, mesh, shardings = setup
    loss_fn = toy.make_loss_fn()
    batch = toy.make_batch(seed=5, rows=ROWS)
    layout = batch_shardings(batch, mesh)
    assert layout["input_ids"].spec == P("fsdp", None) and layout["feat"].spec == P("fsdp", None)
    sharded_step = make_train_step(loss_fn, opt, grad_accum_steps=2, state_shardings=shardings,
                                   batch_shardings=layout, compiler_options=toy.COMPILER_OPTIONS)
    single_step = toy.train_step(dropout=0.0)
    sharded = train_state_from_params(toy.init_params(), opt, jax.random.PRNGKey(0), shardings)
    single = train_state_from_params(toy.init_params(), opt, jax.random.PRNGKey(0))
    for _ in range(3):
        sharded, m_sharded = sharded_step(sharded, batch)
        single, m_single = single_step(single, batch)
        np.testing.assert_allclose(float(m_sharded["loss"]), float(m_single["loss"]), rtol=2e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6),
                 sharded.params, single.params)
    kernel = sharded.params["lm_head"]["kernel"]
    assert kernel.sharding.is_equivalent_to(shardings.params["lm_head"]["kernel"], 2)

    saved = jax.device_get(sharded)
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        ckpt.save(sharded, {"next_index": 3})
    other = make_mesh({"data": 2, "fsdp": 4})
    other_shardings = shardings_for(other, opt)
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        abstract_params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                       shape_tree(toy.init_params()), other_shardings.params)
        params = ckpt.restore_params(abstract_params)
        state, data_state = ckpt.restore_latest(abstract_train_state(opt, shape_tree(toy.init_params()),
                                                                     other_shardings))
    for restored in (params, state.params):
        jax.tree.map(lambda a, sh, ref: (np.testing.assert_array_equal(np.asarray(a), ref),
                                         a.sharding.is_equivalent_to(sh, a.ndim) or pytest.fail(f"{a.sharding}")),
                     restored, other_shardings.params, saved.params)
    assert params["lm_head"]["kernel"].sharding.mesh.shape["data"] == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state), saved.opt_state)
    assert int(state.step) == 3 and data_state == {"next_index": 3}
