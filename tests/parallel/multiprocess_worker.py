"""One process of the multi-process test (test_multiprocess.py): a few train steps of the tiny model on a
global data 2 x fsdp 4 mesh, each process feeding its own slice of one fixed global batch.

    python -m tests.parallel.multiprocess_worker --out DIR [--steps 3]

Started with XLA_FLAGS=--xla_force_host_platform_device_count=N and JAX_PLATFORMS=cpu; with GLMV_COORDINATOR /
GLMV_NUM_PROCESSES / GLMV_PROCESS_ID it joins a multi-process job through parallel.distributed (gloo
collectives on CPU), otherwise it is a single process holding all 8 devices. The run goes through the
trainer's own pieces: train.state (state from host params), train.supervised's loss, train.step, train.loop
(with `put_batch` building global arrays from host-local data), a host-0 MetricsWriter and an Orbax
Checkpointer saving the final state from every process into DIR/ckpt.
Writes DIR/result_<process>.json (losses, whether this process logged) and, on process 0, DIR/params.npz
(the full final params, gathered from every process).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

from glmv_jax.parallel.distributed import initialize_from_env

MESH = {"data": 2, "fsdp": 4}
ROWS, LENGTH, IMAGE_GRID = 8, 32, (1, 4, 4)   # every row: text, one 4x4-patch image (4 tokens), text
OPTIMIZER = dict(lr=3e-3, warmup_steps=0, total_steps=100, final_lr_fraction=1.0, weight_decay=0.01)
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def global_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed BATCH.md batch of ROWS rows. Every row holds exactly 16 patch rows and the patch budget is
    exactly filled, so slicing rows and patch rows by host gives each host its own images' patches."""
    from glmv_jax.models.glmv import prepare_inputs
    rng = np.random.default_rng(seed)
    t, h, w = IMAGE_GRID
    image = [config.image_start_token_id] + [config.image_token_id] * (t * h * w // 4) + [config.image_end_token_id]
    ids = []
    for _ in range(ROWS):
        before = int(rng.integers(2, 8))
        after = LENGTH - before - len(image)
        ids.append(list(rng.integers(2, 200, before)) + image + list(rng.integers(2, 200, after)))
    ids = np.asarray(ids, np.int32)
    pixels = rng.standard_normal((ROWS * t * h * w, config.vision.patch_dim)).astype(np.float32)
    batch, _ = prepare_inputs(config, ids, pixel_values=pixels, image_grid_thw=np.asarray([IMAGE_GRID] * ROWS))
    batch.pop("patch_frames")          # optional; its slot indices are per batch, not per host
    targets = np.concatenate([ids[:, 1:], np.zeros((ROWS, 1), np.int32)], axis=1)
    loss_mask = (batch["token_type"] == 0) & (np.roll(batch["token_type"], -1, axis=1) == 0)
    loss_mask[:, -1] = False
    batch.update(targets=targets, loss_mask=loss_mask.astype(np.float32))
    return batch


def numpy_init(abstract_params, seed: int = 0) -> dict:
    """Host-side init (no init program to compile): norm scales 1, biases 0, other leaves N(0, 0.02)."""
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name or "bias" in name:
            return np.full(leaf.shape, float("scale" in name), np.float32)
        return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(init, abstract_params)


def host_local(array: np.ndarray, sharding) -> np.ndarray:
    """The block of the global `array` that this process's devices hold (one contiguous block per host)."""
    blocks = sharding.addressable_devices_indices_map(array.shape).values()
    box = []
    for dim, size in enumerate(array.shape):
        starts = [b[dim].start or 0 for b in blocks]
        stops = [size if b[dim].stop is None else b[dim].stop for b in blocks]
        box.append(slice(min(starts), max(stops)))
    return array[tuple(box)]


def to_global(batch: dict, shardings: dict) -> dict:
    """Global jax arrays from each host's own slice (jax.make_array_from_process_local_data)."""
    return {key: jax.make_array_from_process_local_data(shardings[key], host_local(value, shardings[key]),
                                                        value.shape)
            for key, value in batch.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    kind = initialize_from_env()                 # before any device is touched
    jax.config.update("jax_default_matmul_precision", "highest")

    from jax.experimental import multihost_utils
    from glmv_jax.config import tiny
    from glmv_jax.models.glmv import init_params, logical_axes
    from glmv_jax.parallel.mesh import make_mesh
    from glmv_jax.parallel.rules import DEFAULT, tree_shardings
    from glmv_jax.train.checkpoint import Checkpointer
    from glmv_jax.train.experiment import Experiment
    from glmv_jax.train.loop import run_steps
    from glmv_jax.train.metrics import MetricsWriter
    from glmv_jax.train.optimizer import build_optimizer
    from glmv_jax.train.state import state_shardings, train_state_from_params
    from glmv_jax.train.step import batch_shardings, make_train_step
    from glmv_jax.train.supervised import make_loss_fn

    config = tiny()
    mesh = make_mesh(MESH)
    assert mesh.size == 8 and jax.device_count() == 8, (mesh.size, jax.device_count())
    optimizer = build_optimizer(OPTIMIZER)
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    shardings = state_shardings(optimizer, abstract, tree_shardings(logical_axes(config), abstract, mesh, DEFAULT),
                                mesh)
    state = train_state_from_params(numpy_init(abstract), optimizer, jax.random.PRNGKey(0), shardings)
    batch = global_batch(config)
    layout = batch_shardings(batch, mesh, DEFAULT)
    exp = Experiment(cfg=None, workdir=args.out, mesh=mesh, rules=DEFAULT, model_config=config, tokenizer=None,
                     processor=None)
    step_fn = make_train_step(make_loss_fn(exp), optimizer, state_shardings=shardings, batch_shardings=layout,
                              compiler_options=COMPILER_OPTIONS)
    writer = MetricsWriter(os.path.join(args.out, "logs"), args.steps, progress=False)   # host 0 only
    logged = writer.active
    with Checkpointer(os.path.join(args.out, "ckpt"), save_every=args.steps) as ckpt, writer:
        state, history = run_steps(state, iter([batch] * args.steps), step_fn, num_steps=args.steps,
                                   checkpointer=ckpt, metrics_writer=writer, data_iterator=None,
                                   put_batch=lambda b: to_global(b, layout))
    params = multihost_utils.process_allgather(state.params, tiled=True)   # full numpy arrays on every host
    process = jax.process_index()
    result = {"kind": kind, "process": process, "process_count": jax.process_count(),
              "local_devices": jax.local_device_count(), "logged": logged,
              "local_rows": int(host_local(batch["input_ids"], layout["input_ids"]).shape[0]),
              "local_patch_rows": int(host_local(batch["pixel_values"], layout["pixel_values"]).shape[0]),
              "losses": [h["loss"] for h in history], "grad_norms": [h["grad_norm"] for h in history]}
    with open(os.path.join(args.out, f"result_{process}.json"), "w") as f:
        json.dump(result, f)
    if process == 0:
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(os.path.join(args.out, "params.npz"), **flat)
    multihost_utils.sync_global_devices("multiprocess_worker done")


if __name__ == "__main__":
    main()
