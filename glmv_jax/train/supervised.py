"""A supervised stage (pretrain, long_context, sft) from its experiment config: data -> model -> loss ->
step -> loop, with checkpoints, resume, metrics and the optional HF export.

    summary = run_supervised(setup(cfg, workdir))
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from glmv_jax.data.pipeline import make_pipeline
from glmv_jax.models.flops import forward_flops
from glmv_jax.models.glmv import apply_hidden, apply_with_aux, init_params
from glmv_jax.models.moe_balance import update_correction_bias
from glmv_jax.sharding.global_batch import global_batch
from glmv_jax.train.checkpoint import Checkpointer, export_hf
from glmv_jax.train.experiment import Experiment, initial_params, param_shardings
from glmv_jax.train.loop import restore_or_init, run_steps
from glmv_jax.train.losses import chunked_cross_entropy, cross_entropy
from glmv_jax.train.metrics import MetricsWriter, measure_peak_flops, read_metrics
from glmv_jax.train.optimizer import build_optimizer
from glmv_jax.train.state import abstract_train_state, init_train_state, state_shardings, train_state_from_params
from glmv_jax.train.step import make_train_step, presplit

TRAIN_DEFAULTS = dict(            # the experiment config's `train` block: its keys and defaults
    steps=100, grad_accum_steps=1, log_every=10, save_every=50, keep=3,
    nonfinite="skip",             # skip | raise: a step whose loss or gradients are not finite
    z_loss=0.0,
    loss_chunk=1024,              # cross-entropy over this many positions at a time (no whole [B, T, V] logits); 0 = off
    moe_bias_rate=1e-3,           # aux-loss-free router bias update speed (MoE decoders; 0 = off)
    moe_seq_aux_coef=0.0,         # sequence-level balance loss coefficient (1e-4 in the paper; 0 = off)
    init_from="",                 # a previous stage's work directory: params only
    restore_fallback=True,        # an unreadable checkpoint step: log it, keep it aside, restore the one before
    export_hf="",                 # write the final params as an HF checkpoint here (with tokenizer, processor)
)


def make_loss_fn(exp: Experiment, z_loss: float = 0.0, moe_seq_aux_coef: float = 0.0, loss_chunk: int = 0):
    """loss_fn(params, batch, rng) -> (loss_sum, (token_count, aux)) over a BATCH.md batch. For MoE models
    aux carries the per-layer expert loads ("moe_load_sum" [L, E]) for the correction-bias rule and, when
    its coefficient is > 0, the sequence-level balance loss ("moe_seq_aux_loss"). `loss_chunk` > 0 computes
    the cross-entropy `loss_chunk` positions at a time (losses.chunked_cross_entropy: the [B, T, V] logits
    are never held whole; same values); it must divide data.seq_len (a chunk >= seq_len means one chunk: off)."""
    config = exp.model_config
    if loss_chunk:
        seq_len = exp.cfg.data.seq_len
        loss_chunk = 0 if loss_chunk >= seq_len else loss_chunk
        if loss_chunk < 0 or (loss_chunk and seq_len % loss_chunk):
            raise ValueError(f"train.loss_chunk {loss_chunk} must be 0 (off) or a positive divisor of data.seq_len "
                             f"{seq_len}")

    def loss_fn(params, batch, rng):
        del rng
        if loss_chunk:
            hidden, kernel, aux = apply_hidden(config, params, batch)
            loss_sum, count, extras = chunked_cross_entropy(hidden, kernel, batch["targets"], batch["loss_mask"],
                                                            chunk_size=loss_chunk, z_loss=z_loss)
        else:
            logits, aux = apply_with_aux(config, params, batch)
            loss_sum, count, extras = cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)
        out = {"ce_sum": extras["ce_sum"]}
        moe = aux.get("moe") if isinstance(aux, dict) else None
        if moe:
            out["moe_load_sum"] = moe["load"].astype(jnp.float32)
            out["moe_dropped_sum"] = jnp.sum(moe["dropped"]).astype(jnp.float32)
            if moe_seq_aux_coef > 0:
                out["moe_seq_aux_loss"] = moe_seq_aux_coef * jnp.sum(moe["seq_aux_loss"])
        return loss_sum, (count, out)

    return loss_fn


def stage_loss_fn(exp: Experiment):
    """make_loss_fn with the stage config's train.z_loss, train.moe_seq_aux_coef and train.loss_chunk."""
    t = exp.cfg.train
    return make_loss_fn(exp, t.z_loss, t.moe_seq_aux_coef, t.loss_chunk)


def make_bias_rule(exp: Experiment, rate: float):
    """post_update(params, aux): the MoE router's aux-loss-free correction-bias update from summed loads."""
    if not exp.model_config.text.moe or rate <= 0:
        return None

    def rule(params, aux):
        router = params["text"]["moe_layers"]["moe"]["router"]
        bias = update_correction_bias(router["correction_bias"], aux["moe_load_sum"], rate)
        new_router = {**router, "correction_bias": bias}
        moe = {**params["text"]["moe_layers"]["moe"], "router": new_router}
        return {**params, "text": {**params["text"], "moe_layers": {**params["text"]["moe_layers"], "moe": moe}}}

    return rule


def flops_per_token(exp: Experiment) -> float:
    """Training FLOPs per packed token (3x forward: forward + backward), counting the vision tower on a
    full patch budget spread over the rows."""
    d = exp.cfg.data
    side = d.image_size // exp.model_config.vision.patch_size
    images_per_row = max(1, d.patch_budget // max(1, side * side) // d.batch_size)
    fwd = forward_flops(exp.model_config, 1, d.seq_len, [(1, side, side)] * images_per_row)
    return 3.0 * fwd / d.seq_len


def batch_putter(exp: Experiment):
    """put_batch(host batch) -> the global batch on exp.mesh (parallel.global_batch): every host's packed
    batch joined into one, index keys made global, laid out with the train step's batch shardings."""
    merge_area = exp.model_config.vision.spatial_merge_size ** 2
    return lambda batch: global_batch(batch, exp.mesh, exp.rules, merge_area)


def run_supervised(exp: Experiment, progress: bool = True) -> dict[str, Any]:

    cfg, k = exp.cfg, exp.cfg.train.grad_accum_steps
    optimizer = build_optimizer(cfg.optimizer)
    abstract_params, shardings = param_shardings(exp)
    sharded = exp.mesh.size > 1
    st_shardings = state_shardings(optimizer, abstract_params, shardings, exp.mesh) if sharded else None
    loss_fn = stage_loss_fn(exp)
    step_fn = make_train_step(loss_fn, optimizer, grad_accum_steps=k, nonfinite=cfg.train.nonfinite,
                              split_fn=presplit if k > 1 else None, state_shardings=st_shardings, rules=exp.rules,
                              post_update=make_bias_rule(exp, cfg.train.moe_bias_rate))
    batches = make_pipeline(cfg.data, exp.tokenizer, exp.processor, micro_batches=k, seed=cfg.seed)
    rng = jax.random.key(cfg.seed)

    def fresh_state():
        params = initial_params(exp, abstract_params, shardings)
        if params is None:
            return init_train_state(lambda r: init_params(exp.model_config, r), optimizer, rng, st_shardings)
        return train_state_from_params(params, optimizer, rng, st_shardings)

    ckpt_dir = os.path.join(exp.workdir, "checkpoints")
    with Checkpointer(ckpt_dir, save_every=cfg.train.save_every, keep=cfg.train.keep) as ckpt:
        state = restore_or_init(ckpt, abstract_train_state(optimizer, abstract_params, st_shardings, rng),
                                fresh_state, batches, fallback=cfg.train.restore_fallback)
        start = int(jax.device_get(state.step))
        with MetricsWriter(os.path.join(exp.workdir, "logs"), cfg.train.steps, initial_step=start,
                           flops_per_token=flops_per_token(exp), peak_flops=measure_peak_flops(1024),
                           progress=progress, description=cfg.stage) as writer:
            state, history = run_steps(state, batches, step_fn, num_steps=cfg.train.steps, checkpointer=ckpt,
                                       metrics_writer=writer, nonfinite=cfg.train.nonfinite,
                                       log_every=cfg.train.log_every, put_batch=batch_putter(exp))
    if cfg.train.export_hf:
        export_hf(exp.model_config, state.params, cfg.train.export_hf, tokenizer=exp.tokenizer,
                  processor=exp.processor, source=cfg.model.hf_checkpoint or None)
    # the whole stage's rows (earlier invocations' too, one per step), so a resumed run reports and plots
    # what an uninterrupted one would; host 0 writes the log, other hosts keep this invocation's rows
    history = read_metrics(os.path.join(exp.workdir, "logs"), int(jax.device_get(state.step))) or history
    losses = [h["loss"] for h in history if "loss" in h]
    return {"stage": cfg.stage, "start_step": start, "steps": int(jax.device_get(state.step)),
            "first_loss": float(losses[0]) if losses else float("nan"),
            "last_loss": float(np.mean(losses[-5:])) if losses else float("nan"),
            "data": batches.stats() if hasattr(batches, "stats") else {}, "state": state, "history": history}
