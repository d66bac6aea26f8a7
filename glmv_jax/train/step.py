"""The train step: gradient accumulation over micro-batches, token weighting, clipping, NaN/Inf guard.

    def loss_fn(params, batch, rng):          # -> (loss_sum, (token_count, aux))
        ...                                   # loss_sum: sum of token losses (fp32 scalar)
        return loss_sum, (token_count, {"moe_aux_loss": lb, "ce_sum": ce, "dom_loss_sum": per_domain})

    step_fn = make_train_step(loss_fn, optimizer, grad_accum_steps=4, nonfinite="skip")
    state, metrics = step_fn(state, batch)

Objective for a batch of k micro-batches with token counts n_i (N = sum n_i):
    (sum_i loss_sum_i + n_i * aux_i) / N,   aux_i = sum of the aux entries named "aux_loss" or "*_aux_loss"
so k micro-batches give the gradient of one big batch (up to fp32 summation order), and aux losses
(already scaled by their coefficient) are weighted by each micro-batch's share of tokens.
Metrics: loss (= sum loss_sum / N), objective, grad_norm (before clipping), lr, tokens (N, loss tokens),
seq_tokens (tokens processed: segment_ids > 0, else the size of input_ids), nonfinite, nonfinite_count,
and every aux entry: names ending in "_sum" are summed over micro-batches, the others
token-weighted averages.

Micro-batches: by default every batch entry is split along its row axis B (axis 1 for `position_ids`
[3, B, T], axis 0 otherwise) into k strided groups (micro-batch i holds rows i, i+k, ...), so each
micro-batch stays spread over the devices that shard B. Entries that are not per-row (the packed patch
rows `pixel_values` [Np, Pd] ...) need a `split_fn` that knows the pipeline's layout, or `presplit`
batches whose every entry has a leading [k] axis.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from glmv_jax.batch import BATCH_WIDE_KEYS, ROW_AXIS
from glmv_jax.sharding import rules as rules_lib
from glmv_jax.train.optimizer import Optimizer
from glmv_jax.train.state import TrainState

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, tuple[jax.Array, dict]]]
NONFINITE_MODES = ("skip", "raise")


def split_microbatches(batch: dict, k: int) -> dict:
    """Every entry [.., B, ..] -> [k, .., B/k, ..] with micro-batch i = rows i, i+k, i+2k, ...

    The packed patch rows and `patch_frames` (indices into them; BATCH_WIDE_KEYS) belong to the whole batch, not
    to a row, and are refused by name even when Np or F happens to equal B: use presplit batches
    (data.micro_batches / the pipeline's StackIterDataset) whose micro-batches hold their own patches."""
    ref_key = "input_ids" if "input_ids" in batch else sorted(batch)[0]
    rows = batch[ref_key].shape[ROW_AXIS.get(ref_key, 0)]
    if rows % k:
        raise ValueError(f"batch has {rows} rows, not divisible by grad_accum_steps={k}")

    def split(key: str, x: jax.Array) -> jax.Array:
        axis = ROW_AXIS.get(key, 0)
        if key in BATCH_WIDE_KEYS or x.ndim <= axis or x.shape[axis] != rows:
            raise ValueError(f"batch[{key!r}] with shape {x.shape} is not per-row ({rows} rows on axis {axis}); "
                             f"pass make_train_step(split_fn=...) that knows its layout, or presplit batches")
        x = x.reshape(x.shape[:axis] + (rows // k, k) + x.shape[axis + 1:])
        return jnp.moveaxis(x, axis + 1, 0)

    return {key: split(key, value) for key, value in batch.items()}


RESERVED_METRICS = ("loss", "objective", "grad_norm", "lr", "tokens", "seq_tokens", "nonfinite", "nonfinite_count")


def presplit(batch: dict, k: int) -> dict:
    """For batches already made of k micro-batches: every entry has a leading [k] axis. Micro-batch i's
    `patch_frames` [k, F, L] index its own patch rows [k, Np/k, ...] (0..Np/k - 1), as the pipeline's
    StackIterDataset builds them: the step scans over the leading axis, so each micro-batch's ViT sees only
    its own patch rows and frames."""
    for key, value in batch.items():
        if value.shape[:1] != (k,):
            raise ValueError(f"presplit batch[{key!r}] has shape {value.shape}; expected a leading axis of "
                             f"grad_accum_steps={k}")
    return batch


def _is_aux_loss(name: str) -> bool:
    return name == "aux_loss" or name.endswith("_aux_loss")


def _select(mask: Any, tree: Any) -> Any:
    """Leaves of `tree` where mask is True, None elsewhere (None leaves are empty subtrees to jax)."""
    return jax.tree.map(lambda m, x: x if m else None, mask, tree)


def _fill(mask: Any, selected: Any, full: Any) -> Any:
    return jax.tree.map(lambda m, s, f: s if m else f, mask, selected, full)


def make_train_step(loss_fn: LossFn, optimizer: Optimizer, *, grad_accum_steps: int = 1,
                    nonfinite: str = "skip", split_fn: Callable[[dict, int], dict] | None = None,
                    state_shardings: TrainState | None = None, batch_shardings: Any = None,
                    rules: rules_lib.Rules = rules_lib.DEFAULT, donate: bool = True,
                    jit: bool = True, compiler_options: dict | None = None,
                    post_update: Callable[[Any, dict], Any] | None = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Jitted `step(state, batch) -> (new_state, metrics)`; the state buffers are donated.

    With `state_shardings` (TrainState of NamedShardings) the step is jitted with in/out shardings on that
    mesh and the model's activation constraints (`sharding.rules.constrain`) are active while tracing;
    `batch_shardings` (e.g. from `batch_shardings(batch, mesh, rules)`) lays the host batch out on the mesh.
    nonfinite: "skip" leaves params and optimizer state unchanged on a NaN/Inf loss or gradient and counts
    it in `state.nonfinite_count`; "raise" does the same inside the step and `loop.run_steps` stops with
    `NonFiniteError` (metrics["nonfinite"] is 1 for such a step).
    compiler_options: passed to jax.jit (XLA options, e.g. TPU scheduler flags); jit=False returns the
    plain function.
    post_update(params, aux) -> params: runs after the optimizer update (not on skipped steps) with the
    batch's reduced aux dict; the place for rules outside the optimizer, such as the MoE router's
    aux-loss-free correction-bias update from summed expert loads (an aux entry like "moe_load_sum").
    """
    k = int(grad_accum_steps)
    if k < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    split_fn = split_fn or split_microbatches
    mesh = None if state_shardings is None else jax.tree.leaves(state_shardings)[0].mesh

    def micro_grads(train_params, frozen_params, mask, micro_batch, rng):
        def objective(tp):
            loss_sum, (count, aux) = loss_fn(_fill(mask, tp, frozen_params), micro_batch, rng)
            aux_total = sum((v for n, v in aux.items() if _is_aux_loss(n)), jnp.zeros((), jnp.float32))
            count = jax.lax.stop_gradient(jnp.asarray(count, jnp.float32))
            return loss_sum + count * aux_total, (jnp.asarray(loss_sum, jnp.float32), count, aux)
        return jax.grad(objective, has_aux=True)(train_params)

    def weigh_aux(aux: dict, count: jax.Array) -> dict:
        """Per micro-batch: '_sum' entries as they are, others multiplied by the token count."""
        return {n: (v if n.endswith("_sum") else v * count).astype(jnp.float32) for n, v in aux.items()}

    def accumulate(params, mask, batch, rng):
        train_params, frozen = _select(mask, params), params
        if k == 1:
            grads, (loss_sum, count, aux) = micro_grads(train_params, frozen, mask, batch, rng)
            return grads, loss_sum, count, weigh_aux(aux, count)
        micro = split_fn(batch, k)
        rngs = jax.random.split(rng, k)
        first = jax.tree.map(lambda x: x[0], micro)
        aux_shapes = jax.eval_shape(lambda b, r: micro_grads(train_params, frozen, mask, b, r)[1][2], first, rngs[0])
        zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), tree)
        init = (jax.tree.map(jnp.zeros_like, train_params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                zeros(aux_shapes))

        def body(carry, xs):
            g_acc, loss_acc, count_acc, aux_acc = carry
            g, (loss_sum, count, aux) = micro_grads(train_params, frozen, mask, *xs)
            aux = weigh_aux(aux, count)
            return (jax.tree.map(jnp.add, g_acc, g), loss_acc + loss_sum, count_acc + count,
                    jax.tree.map(jnp.add, aux_acc, aux)), None

        (grads, loss_sum, count, aux), _ = jax.lax.scan(body, init, (micro, rngs))
        return grads, loss_sum, count, aux

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        with rules_lib.activation_sharding(mesh, rules):
            mask = optimizer.trainable(state.params)
            rng = jax.random.fold_in(state.rng, state.step)
            grads, loss_sum, count, aux = accumulate(state.params, mask, batch, rng)
        clash = sorted(set(aux) & set(RESERVED_METRICS))
        if clash:
            raise ValueError(f"loss_fn aux entries {clash} clash with the step's own metrics; rename them")
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        aux = {n: (v if n.endswith("_sum") else v / denom) for n, v in aux.items()}
        loss = loss_sum / denom
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(_):
            full_grads = _fill(mask, grads, jax.tree.map(jnp.zeros_like, state.params))
            updates, opt_state = optimizer.tx.update(full_grads, state.opt_state, state.params)
            # Only trainable leaves are written: frozen/fixed leaves stay bit-identical (even -0.0).
            params = jax.tree.map(lambda m, p, u: (p + u).astype(p.dtype) if m else p, mask, state.params, updates)
            if post_update is not None:
                params = post_update(params, aux)
            return params, opt_state

        params, opt_state = jax.lax.cond(finite, apply, lambda _: (state.params, state.opt_state), None)
        skipped = (~finite).astype(jnp.int32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  nonfinite_count=state.nonfinite_count + skipped)
        metrics = {"loss": loss, "objective": loss + sum((v for n, v in aux.items() if _is_aux_loss(n)), 0.0),
                   "grad_norm": grad_norm, "lr": optimizer.schedule(state.applied_updates), "tokens": count,
                   "nonfinite": skipped, "nonfinite_count": new_state.nonfinite_count, **aux}
        if "segment_ids" in batch:       # tokens the model processed (for throughput / MFU), not loss tokens
            metrics["seq_tokens"] = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)
        elif "input_ids" in batch:
            metrics["seq_tokens"] = jnp.float32(batch["input_ids"].size)
        return new_state, metrics

    if not jit:
        return step
    donate_argnums = (0,) if donate else ()
    if state_shardings is None:
        return jax.jit(step, donate_argnums=donate_argnums, compiler_options=compiler_options)
    replicated = NamedSharding(mesh, P())
    if batch_shardings is None:   # inputs keep the shardings they arrive with (the state is born sharded)
        return jax.jit(step, out_shardings=(state_shardings, replicated), donate_argnums=donate_argnums,
                       compiler_options=compiler_options)
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, replicated),
                   donate_argnums=donate_argnums, compiler_options=compiler_options)
