"""Orbax checkpoints of the train state and the data iterator state; HF export.

    ckpt = Checkpointer(workdir / "checkpoints", save_every=500, keep=3)
    restored = ckpt.restore_latest(abstract_train_state(opt, abstract_params, shardings))
    if restored: state, data_state = restored; data_iter.set_state(data_state)
    ...
    if ckpt.should_save(step): ckpt.save(state, data_iter.get_state(), step)  # async, commit by rename
    ckpt.close()                                     # waits for the last save

A step directory holds two items: "state" (the TrainState pytree: step, params, opt_state, rng,
nonfinite_count; OCDBT/Zarr via PyTreeSave) and "data" (the iterator state: a JSON-able dict, or bytes
from a Grain DataLoader iterator, stored as {"bytes": text}). Orbax writes each step into a temporary
directory and renames it on commit, so a process killed mid-save leaves the previous step restorable;
leftover temporary directories are never listed as steps and are removed when the next manager opens.
Restores take abstract trees (jax.ShapeDtypeStruct with NamedShardings), so a checkpoint saved on one
mesh restores onto another; `restore_params` restores the params alone (into another stage's state).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from glmv_jax.convert.hf import save_pretrained
from glmv_jax.train.state import TrainState, default_sharding

STATE, DATA = "state", "data"


def _restore_args(abstract_tree: Any) -> Any:
    """Orbax restore args; leaves without a sharding restore onto `state.default_sharding()`."""
    default = default_sharding()
    with_sharding = jax.tree.map(
        lambda x: x if getattr(x, "sharding", None) is not None else jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                                           sharding=default),
        abstract_tree)
    return with_sharding, ocp.checkpoint_utils.construct_restore_args(with_sharding)


def _encode_data_state(data_state: Any) -> dict:
    if data_state is None:
        return {"none": True}
    if isinstance(data_state, bytes):
        return {"bytes": data_state.decode("utf-8")}
    if isinstance(data_state, dict):
        return {"state": data_state}
    raise TypeError(f"data iterator state must be a JSON-able dict or bytes (Grain get_state), "
                    f"got {type(data_state).__name__}")


def _decode_data_state(stored: dict) -> Any:
    if stored.get("none"):
        return None
    if "bytes" in stored:
        return stored["bytes"].encode("utf-8")
    return stored["state"]


class Checkpointer:
    """Thin wrapper around `ocp.CheckpointManager`: save every N steps, keep the last K, async."""

    def __init__(self, directory: str | os.PathLike, save_every: int, keep: int | None = 3,
                 async_save: bool = True):
        if save_every < 1:
            raise ValueError(f"checkpoint save_every must be >= 1, got {save_every}")
        if keep is not None and keep < 1:
            raise ValueError(f"checkpoint keep must be >= 1 or None (keep all), got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = int(save_every)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=self.save_every, max_to_keep=keep, create=True,
            cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
        handlers = {STATE: ocp.PyTreeCheckpointHandler(), DATA: ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # ------------------------------------------------------------------ saving
    def save(self, state: TrainState, data_state: Any = None, step: int | None = None) -> bool:
        """Starts an async save of `state` (returns once the arrays are copied off the devices).

        step: the host's copy of `state.step` (read from the state, a device sync, when omitted).
        """
        step = int(jax.device_get(state.step)) if step is None else int(step)
        args = ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(state),
                                     DATA: ocp.args.JsonSave(_encode_data_state(data_state))})
        return self.manager.save(step, args=args, force=True)

    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0 and step != self.manager.latest_step()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ restoring
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, Any]:
        """(state, data_state) of `step`; arrays laid out as the abstract tree's shardings say."""
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f"no committed checkpoint for step {step} in {self.directory} "
                                    f"(have {self.all_steps()})")
        item, restore_args = _restore_args(abstract_state)
        state_args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args)
        args = ocp.args.Composite(**{STATE: state_args, DATA: ocp.args.JsonRestore()})
        restored = self.manager.restore(step, args=args)
        return restored[STATE], _decode_data_state(restored[DATA])

    def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, Any] | None:
        """(state, data_state) of the latest committed step, or None when there is none."""
        step = self.latest_step()
        return None if step is None else self.restore(step, abstract_state)

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """The params alone (latest step by default), onto the shardings of `abstract_params`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
        item, restore_args = _restore_args({"params": abstract_params})
        args = ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                   partial_restore=True)})
        return self.manager.restore(step, args=args)[STATE]["params"]


def export_hf(config: Any, params: Any, out_dir: str | os.PathLike, **kwargs) -> list:
    """Writes an HF checkpoint (config.json + safetensors) loadable by transformers' from_pretrained;
    kwargs (dtype, max_shard_size, ...) go to convert.hf.save_pretrained. Returns the files written."""
    return save_pretrained(config, jax.device_get(params), os.fspath(out_dir), **kwargs)
