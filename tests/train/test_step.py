"""Train step on a tiny real model: learning, accumulation == big batch, freezing, fixed router bias, NaN policy."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from glmv_jax.train.loop import NonFiniteError, run_steps
from glmv_jax.train.metrics import MetricsWriter
from glmv_jax.train.state import train_state_from_params
from glmv_jax.sharding.mesh import make_mesh
from glmv_jax.sharding.global_batch import batch_shardings
from glmv_jax.train.step import make_train_step, presplit, split_microbatches
from tests.train import toy


def bits(tree):
    return jax.tree.map(lambda x: np.atleast_1d(np.asarray(x)).view(np.uint8).copy(), jax.device_get(tree))


def assert_bit_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, bits(a), bits(b))


def toy_params():
    params = toy.init_params()
    params["vision"]["proj"]["kernel"][0, 0] = -0.0            # p + 0.0 would turn this into +0.0
    params["text"]["moe"]["router"]["correction_bias"][0] = -0.0
    return params


@pytest.fixture(scope="module")
def frozen_opt():
    return toy.optimizer()


@pytest.fixture(scope="module")
def main_step():
    return toy.train_step(dropout=0.1)


def fresh(opt):
    return train_state_from_params(toy_params(), opt, jax.random.PRNGKey(0))


def test_loss_decreases_frozen_and_fixed_leaves_bit_identical(frozen_opt, main_step):
    state = fresh(frozen_opt)
    start = jax.device_get(state.params)
    batch = toy.make_batch()
    losses = []
    for _ in range(12):
        state, metrics = main_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    end = jax.device_get(state.params)
    assert_bit_equal(end["vision"], start["vision"])
    assert_bit_equal(end["text"]["moe"]["router"]["correction_bias"], start["text"]["moe"]["router"]["correction_bias"])
    for path in (("lm_head", "kernel"), ("text", "moe", "router", "kernel"), ("text", "layers", "mlp_norm", "scale")):
        a, b = end, start
        for key in path:
            a, b = a[key], b[key]
        assert np.abs(a - b).max() > 1e-4, path
    assert int(state.step) == 12 and int(state.nonfinite_count) == 0
    assert float(metrics["seq_tokens"]) == toy.B * toy.T and float(metrics["tokens"]) == batch["loss_mask"].sum()


def test_accumulation_equals_one_big_batch(frozen_opt):
    """k=4 micro-batches with different token counts give the big batch's loss, grad norm and update."""
    batch = toy.make_batch(seed=3)
    counts = batch["loss_mask"].reshape(2, 4, -1).transpose(1, 0, 2).sum(axis=(1, 2))
    assert len(set(counts.tolist())) > 1, counts                 # micro-batches are unequal in tokens
    results = []
    for k in (1, 4):
        state = fresh(frozen_opt)
        step = toy.train_step(dropout=0.0, grad_accum_steps=k)
        for _ in range(3):   # step 0 has lr 0 (warmup); later steps move the params
            state, metrics = step(state, batch)
        results.append((jax.device_get(state), jax.device_get(metrics)))
    (big, m_big), (acc, m_acc) = results
    for name in ("loss", "objective", "grad_norm", "moe_aux_loss", "ce_sum"):
        np.testing.assert_allclose(m_acc[name], m_big[name], rtol=2e-6, err_msg=name)
    assert m_acc["tokens"] == m_big["tokens"] == batch["loss_mask"].sum()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), acc.params, big.params)
    assert np.abs(acc.params["lm_head"]["kernel"] - toy_params()["lm_head"]["kernel"]).max() > 1e-3


def test_nonfinite_batch_is_skipped_and_counted(frozen_opt, main_step):
    state = fresh(frozen_opt)
    state, _ = main_step(state, toy.make_batch())
    before = jax.device_get(state)
    bad = toy.make_batch()
    bad["feat"][3, 0] = np.nan
    state, metrics = main_step(state, bad)
    assert int(metrics["nonfinite"]) == 1 and int(state.nonfinite_count) == 1 and int(state.step) == 2
    assert not np.isfinite(float(metrics["loss"]))
    assert_bit_equal(state.params, before.params)
    assert_bit_equal(state.opt_state, before.opt_state)
    # The next good step applies an update at the schedule position of 1 applied update.
    state, metrics = main_step(state, toy.make_batch())
    assert int(metrics["nonfinite"]) == 0 and int(state.nonfinite_count) == 1
    np.testing.assert_allclose(float(metrics["lr"]), float(frozen_opt.schedule(1)), rtol=1e-7)
    assert np.abs(jax.device_get(state.params)["lm_head"]["kernel"] - before.params["lm_head"]["kernel"]).max() > 0


def test_nonfinite_raise_stops_the_loop(frozen_opt, main_step, tmp_path):
    bad = toy.make_batch()
    bad["feat"][0, 0] = np.inf
    batches = iter([toy.make_batch(), bad, toy.make_batch(), toy.make_batch()])
    with pytest.raises(NonFiniteError, match="step 2: non-finite loss"):
        run_steps(fresh(frozen_opt), batches, main_step, num_steps=4, nonfinite="raise")
    # The same data in skip mode runs through and counts the step.
    batches = iter([toy.make_batch(), bad, toy.make_batch(), toy.make_batch()])
    with MetricsWriter(tmp_path, total_steps=4, progress=False, is_host0=True) as writer:
        state, history = run_steps(fresh(frozen_opt), batches, main_step, num_steps=4, nonfinite="skip",
                                   metrics_writer=writer, log_every=2)
    assert [h["nonfinite"] for h in history] == [0, 1, 0, 0] and int(state.nonfinite_count) == 1
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["nonfinite_count"]) for r in logged] == [(2, 1), (4, 1)]
    assert logged[1]["loss"] == history[3]["loss"]


def test_split_microbatches_strided_rows_and_position_axis():
    B, T, k = 6, 4, 3
    rows = np.arange(B, dtype=np.int32)
    batch = {"input_ids": np.repeat(rows[:, None], T, 1), "position_ids": np.broadcast_to(rows[None, :, None], (3, B, T))}
    micro = split_microbatches({k_: jnp.asarray(v) for k_, v in batch.items()}, k)
    assert micro["input_ids"].shape == (k, B // k, T) and micro["position_ids"].shape == (k, 3, B // k, T)
    for i in range(k):   # micro-batch i holds rows i, i+k, ...
        np.testing.assert_array_equal(micro["input_ids"][i, :, 0], rows[i::k])
        np.testing.assert_array_equal(micro["position_ids"][i, 1, :, 0], rows[i::k])
    with pytest.raises(ValueError, match="pixel_values.*not per-row"):
        split_microbatches({**batch, "pixel_values": np.zeros((10, 12))}, k)
    with pytest.raises(ValueError, match="not divisible by grad_accum_steps=4"):
        split_microbatches(batch, 4)
    with pytest.raises(ValueError, match="leading axis of grad_accum_steps=3"):
        presplit(batch, 3)


def test_batch_shardings_rows_and_patches():
    mesh = make_mesh({"data": 2, "fsdp": 4})
    batch = {"input_ids": np.zeros((8, 5)), "position_ids": np.zeros((3, 8, 5)), "pixel_values": np.zeros((16, 12)),
             "patch_segment": np.zeros((16,)), "loss_mask": np.zeros((2, 5))}
    specs = {k: v.spec for k, v in batch_shardings(batch, mesh).items()}
    assert specs["input_ids"] == P(("data", "fsdp"), None) and specs["position_ids"] == P(None, ("data", "fsdp"), None)
    assert specs["pixel_values"] == P(("data", "fsdp"), None) and specs["patch_segment"] == P(("data", "fsdp"))
    assert specs["loss_mask"] == P("data", None)     # 2 rows: only the axes that divide are kept


def test_bad_step_arguments(frozen_opt):
    loss_fn = toy.make_loss_fn()
    with pytest.raises(ValueError, match="grad_accum_steps"):
        make_train_step(loss_fn, frozen_opt, grad_accum_steps=0)
    with pytest.raises(ValueError, match="nonfinite"):
        make_train_step(loss_fn, frozen_opt, nonfinite="ignore")

    def clashing(params, batch, rng):
        loss_sum, (count, aux) = loss_fn(params, batch, rng)
        return loss_sum, (count, {**aux, "grad_norm": 0.0})

    with pytest.raises(ValueError, match=r"aux entries \['grad_norm'\] clash"):
        make_train_step(clashing, frozen_opt)(fresh(frozen_opt), toy.make_batch())
