"""One process of the multi-process test (test_multiprocess.py): a few train steps of the tiny model on a
global data 2 x fsdp 4 mesh, each process feeding its own packed host batch through the supervised trainer's
put path (`train.supervised.batch_putter` -> `parallel.global_batch`).

    python -m tests.sharding.multiprocess_worker --out DIR [--steps 2]

Started with XLA_FLAGS=--xla_force_host_platform_device_count=N and JAX_PLATFORMS=cpu; with GLMV_COORDINATOR /
GLMV_NUM_PROCESSES / GLMV_PROCESS_ID it joins a multi-process job through sharding.distributed (gloo
collectives on CPU) and feeds `host_batch(process)`; otherwise it is a single process holding all 8 devices
and feeds `reference_batch()`: the same 8 rows and 3 images packed as one compact batch (patch rows without
gaps, built independently of the per-host index offsets).
The hosts' patch fill is uneven (host 0: two images, 48 of 64 patch rows; host 1: one image in its second
row, 16 of 64, more text and a padded row), and every batch carries patch_frames.
The run goes through train.state, train.supervised's loss and put path, train.step, train.loop, a host-0
MetricsWriter and an Orbax Checkpointer saving the final state from every process into DIR/ckpt.
Writes DIR/result_<process>.json and, on process 0, DIR/params.npz (the full final params).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

from glmv_jax.sharding.distributed import initialize_from_env

MESH = {"data": 2, "fsdp": 4}
ROWS, LENGTH = 4, 32                      # per host
PATCHES, FRAMES, FRAME_LEN = 64, 2, 32    # per host: Np, patch_frames [F, L]
HOST_IMAGES = ({0: (1, 4, 4), 2: (1, 4, 8)}, {1: (1, 4, 4)})   # per host: row -> image (t, h, w) patch grid
PADDED_ROWS = ({}, {3: 20})               # per host: row -> real tokens (the rest is padding)
OPTIMIZER = dict(lr=3e-3, warmup_steps=0, total_steps=100, final_lr_fraction=1.0, weight_decay=0.01)
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def host_rows(config, host: int) -> list[tuple[np.ndarray, np.ndarray, tuple | None, np.ndarray | None]]:
    """Host `host`'s rows: (token ids [LENGTH], attention mask [LENGTH], image grid or None, pixel rows or
    None), drawn from a per-host seed."""
    rng = np.random.default_rng(100 + host)
    rows = []
    for r in range(ROWS):
        grid = HOST_IMAGES[host].get(r)
        real = PADDED_ROWS[host].get(r, LENGTH)
        ids = np.zeros(LENGTH, np.int32)
        ids[:real] = rng.integers(2, 200, real)
        pixels = None
        if grid is not None:
            image = [config.image_start_token_id] + [config.image_token_id] * (int(np.prod(grid)) // 4) + \
                [config.image_end_token_id]
            start = int(rng.integers(1, 6))
            ids[start:start + len(image)] = image
            pixels = rng.standard_normal((int(np.prod(grid)), config.vision.patch_dim)).astype(np.float32)
        rows.append((ids, (np.arange(LENGTH) < real).astype(np.int32), grid, pixels))
    return rows


def make_batch(config, rows, patches: int, frames: int) -> dict[str, np.ndarray]:
    """A BATCH.md batch of these rows with `patches` patch rows (real rows first, in token order) and
    patch_frames [frames, FRAME_LEN]; targets / loss_mask: next token inside the row, text to text."""
    from glmv_jax.batch import frame_slots, pad_batch
    from glmv_jax.models.glmv import prepare_inputs
    ids = np.stack([r[0] for r in rows])
    mask = np.stack([r[1] for r in rows])
    images = [r for r in rows if r[2] is not None]
    batch, _ = prepare_inputs(config, ids, mask, pixel_values=np.concatenate([r[3] for r in images]),
                              image_grid_thw=np.asarray([r[2] for r in images]))
    batch = pad_batch(batch, LENGTH, patches)
    batch["patch_frames"] = frame_slots(batch["patch_segment"], frames=frames, frame_len=FRAME_LEN)
    targets = np.concatenate([ids[:, 1:], np.zeros((len(rows), 1), np.int32)], axis=1)
    text = (batch["token_type"] == 0) & (mask > 0)
    loss_mask = text & np.roll(text, -1, axis=1)
    loss_mask[:, -1] = False
    batch.update(targets=np.where(loss_mask, targets, 0).astype(np.int32), loss_mask=loss_mask.astype(np.float32))
    return batch


def host_batch(config, host: int) -> dict[str, np.ndarray]:
    """What host `host`'s pipeline would pack: its own rows, PATCHES patch rows with host-local indices."""
    return make_batch(config, host_rows(config, host), PATCHES, FRAMES)


def reference_batch(config, hosts: int = 2) -> dict[str, np.ndarray]:
    """The global batch (host 0's rows, then host 1's) packed as one: patch rows without gaps."""
    return make_batch(config, [row for h in range(hosts) for row in host_rows(config, h)], hosts * PATCHES,
                      hosts * FRAMES)


def numpy_init(abstract_params, seed: int = 0) -> dict:
    """Host-side init (no init program to compile): norm scales 1, biases 0, other leaves N(0, 0.02)."""
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name or "bias" in name:
            return np.full(leaf.shape, float("scale" in name), np.float32)
        return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(init, abstract_params)


def gather_path_agrees(batch: dict, mesh, put: dict) -> bool:
    """global_batch with every key replicated (each host all-gathers the others' blocks) equals the
    process-blocked arrays `put` made from the same host batch."""
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    from glmv_jax.sharding.global_batch import global_batch
    replicated = global_batch(batch, mesh, shardings={key: NamedSharding(mesh, P()) for key in put})
    blocked = multihost_utils.process_allgather(put, tiled=True)
    return all(np.array_equal(np.asarray(replicated[k].addressable_data(0)), np.asarray(blocked[k])) for k in put)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    kind = initialize_from_env()                 # before any device is touched
    jax.config.update("jax_default_matmul_precision", "highest")

    from jax.experimental import multihost_utils
    from glmv_jax.config import tiny
    from glmv_jax.models.glmv import init_params, logical_axes
    from glmv_jax.sharding.mesh import make_mesh
    from glmv_jax.sharding.rules import DEFAULT, tree_shardings
    from glmv_jax.train.checkpoint import Checkpointer
    from glmv_jax.train.experiment import Experiment
    from glmv_jax.train.loop import run_steps
    from glmv_jax.train.metrics import MetricsWriter
    from glmv_jax.train.optimizer import build_optimizer
    from glmv_jax.train.state import state_shardings, train_state_from_params
    from glmv_jax.train.step import make_train_step
    from glmv_jax.train.supervised import batch_putter, make_loss_fn

    config = tiny()
    mesh = make_mesh(MESH)
    assert mesh.size == 8 and jax.device_count() == 8, (mesh.size, jax.device_count())
    process, processes = jax.process_index(), jax.process_count()
    optimizer = build_optimizer(OPTIMIZER)
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    shardings = state_shardings(optimizer, abstract, tree_shardings(logical_axes(config), abstract, mesh, DEFAULT),
                                mesh)
    state = train_state_from_params(numpy_init(abstract), optimizer, jax.random.PRNGKey(0), shardings)
    batch = host_batch(config, process) if processes > 1 else reference_batch(config)
    exp = Experiment(cfg=None, workdir=args.out, mesh=mesh, rules=DEFAULT, model_config=config, tokenizer=None,
                     processor=None)
    put = batch_putter(exp)                      # run_supervised's own put path
    step_fn = make_train_step(make_loss_fn(exp), optimizer, state_shardings=shardings,
                              compiler_options=COMPILER_OPTIONS)
    writer = MetricsWriter(os.path.join(args.out, "logs"), args.steps, progress=False)   # host 0 only
    logged = writer.active
    with Checkpointer(os.path.join(args.out, "ckpt"), save_every=args.steps) as ckpt, writer:
        state, history = run_steps(state, iter([batch] * args.steps), step_fn, num_steps=args.steps,
                                   checkpointer=ckpt, metrics_writer=writer, data_iterator=None, put_batch=put)
    params = multihost_utils.process_allgather(state.params, tiled=True)   # full numpy arrays on every host
    put_batch = put(batch)
    result = {"kind": kind, "process": process, "process_count": processes,
              "local_devices": jax.local_device_count(), "logged": logged,
              "local_rows": int(batch["input_ids"].shape[0]), "local_patch_rows": int(batch["pixel_values"].shape[0]),
              "real_patch_rows": int((batch["patch_segment"] > 0).sum()),
              "global_rows": int(put_batch["input_ids"].shape[0]),
              "global_patch_rows": int(put_batch["pixel_values"].shape[0]),
              "gather_path_agrees": gather_path_agrees(batch, mesh, put_batch),
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
