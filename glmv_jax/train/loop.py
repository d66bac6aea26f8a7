"""The step loop with checkpoint/resume of the train state and the data iterator, metrics and NaN policy.

    data_iter = iter(dataset)                       # has get_state() / set_state() (Grain iterators do)
    state = restore_or_init(ckpt, abstract_state, lambda: init_train_state(...), data_iter)
    state, history = run_steps(state, data_iter, step_fn, num_steps=cfg.train.steps, checkpointer=ckpt,
                               metrics_writer=writer, nonfinite=cfg.train.nonfinite)

`num_steps` is the target step count of the whole run, so a rerun after a crash resumes from the last
checkpoint and continues to the same target; with a deterministic iterator the resumed losses equal an
uninterrupted run bit for bit. Metrics are fetched one step late (after the next step is dispatched) so
the host never stalls the device pipeline.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax

from glmv_jax.train.checkpoint import Checkpointer
from glmv_jax.train.metrics import MetricsWriter, flatten_metrics
from glmv_jax.train.state import TrainState


class NonFiniteError(FloatingPointError):
    """A step produced a NaN/Inf loss or gradient and the config says nonfinite='raise'."""


def restore_or_init(checkpointer: Checkpointer | None, abstract_state: TrainState,
                    init_fn: Callable[[], TrainState], data_iterator: Any = None, fallback: bool = False) -> TrainState:
    """The latest checkpoint (also restoring the data iterator's position), else `init_fn()`. fallback: an
    unreadable step (its data iterator state included) gives way to the step before it
    (Checkpointer.restore_latest)."""
    set_data_state = None if data_iterator is None else data_iterator.set_state
    restored = checkpointer.restore_latest(abstract_state, set_data_state, fallback) if checkpointer is not None else None
    return init_fn() if restored is None else restored[0]


def _iterator_state(data_iterator: Any) -> Any:
    return data_iterator.get_state() if data_iterator is not None else None


def run_steps(state: TrainState, batches: Iterator[dict], step_fn: Callable, *, num_steps: int,
              checkpointer: Checkpointer | None = None, metrics_writer: MetricsWriter | None = None,
              nonfinite: str = "skip", data_iterator: Any = "batches", log_every: int = 1,
              on_metrics: Callable[[int, dict], None] | None = None,
              put_batch: Callable[[dict], dict] | None = None) -> tuple[TrainState, list[dict]]:
    """Runs `step_fn` until `state.step == num_steps`; returns (state, per-step host metrics).

    data_iterator: the object whose get_state() is checkpointed with the state ("batches" = the batches
    iterator itself when it has get_state, None = none). on_metrics(step, metrics) is called for every step
    on every host; put_batch lays a host batch out on the devices (default: let jit transfer it).
    """
    if nonfinite not in ("skip", "raise"):
        raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
    if isinstance(data_iterator, str) and data_iterator == "batches":
        data_iterator = batches if hasattr(batches, "get_state") else None
    history: list[dict] = []
    pending = None   # (step, device metrics) of the last dispatched step

    def drain() -> None:
        nonlocal pending
        if pending is None:
            return
        step, device_metrics = pending
        pending = None
        metrics = flatten_metrics(device_metrics)
        history.append({"step": step, **metrics})
        if on_metrics is not None:
            on_metrics(step, metrics)
        if metrics_writer is not None and (step % log_every == 0 or step == num_steps):
            metrics_writer.write(step, device_metrics)
        if nonfinite == "raise" and metrics.get("nonfinite", 0):
            if checkpointer is not None:
                checkpointer.wait()
            raise NonFiniteError(f"step {step}: non-finite loss {metrics.get('loss')} or grad norm "
                                 f"{metrics.get('grad_norm')} (parameters left unchanged; set "
                                 f"nonfinite='skip' to skip such steps)")

    step = int(jax.device_get(state.step))
    if step > num_steps:
        raise ValueError(f"state is at step {step}, past num_steps={num_steps}")
    try:
        while step < num_steps:
            try:
                batch = next(batches)
            except StopIteration:
                raise ValueError(f"data ran out after {step} of {num_steps} steps") from None
            if put_batch is not None:
                batch = put_batch(batch)
            state, device_metrics = step_fn(state, batch)
            step += 1
            drain()
            pending = (step, device_metrics)
            if checkpointer is not None and checkpointer.should_save(step):
                checkpointer.save(state, _iterator_state(data_iterator), step)
        drain()
        if checkpointer is not None and checkpointer.latest_step() != step:
            checkpointer.save(state, _iterator_state(data_iterator), step)
    finally:
        if checkpointer is not None:
            checkpointer.wait()
    return state, history
