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

A committed step that fails to restore (a truncated or corrupt file, or a data state its iterator's
set_state rejects) raises CheckpointError naming the step directory and the file; with fallback,
`restore_latest` logs one line, moves the step aside to `<step>.unreadable` (kept, never deleted) and
restores the step before it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging

from glmv_jax.convert.hf import save_pretrained
from glmv_jax.train.state import TrainState, default_sharding

STATE, DATA = "state", "data"
DATA_FILE = "metadata"           # the data item's JSON file (JsonCheckpointHandler's default name)


class CheckpointError(RuntimeError):
    """A committed checkpoint step that cannot be restored; the message names its directory and file."""


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
        handlers = {STATE: ocp.PyTreeCheckpointHandler(), DATA: ocp.JsonCheckpointHandler(DATA_FILE)}
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

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, Any]:
        """(state, data_state) of `step`; arrays laid out as the abstract tree's shardings say."""
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f"no committed checkpoint for step {step} in {self.directory} "
                                    f"(have {self.all_steps()})")
        item, restore_args = _restore_args(abstract_state)
        state_args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args)
        args = ocp.args.Composite(**{STATE: state_args, DATA: ocp.args.JsonRestore()})
        restored = self._restore(step, args)
        return restored[STATE], _decode_data_state(restored[DATA])

    def restore_latest(self, abstract_state: TrainState, set_data_state: Callable[[Any], None] | None = None,
                       fallback: bool = False) -> tuple[TrainState, Any] | None:
        """(state, data_state) of the latest committed step, or None when there is none. set_data_state (the
        iterator's or sampler's set_state) is applied to the data state: its failure makes the step
        unreadable too. An unreadable step raises CheckpointError; with `fallback` it is logged in one line,
        moved aside (never deleted) and the step before it is restored instead."""
        unreadable = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, data_state = self.restore(step, abstract_state)
                if set_data_state is not None:
                    self._set_data_state(step, set_data_state, data_state)
            except CheckpointError as e:
                if not fallback:
                    raise
                unreadable.append((step, e))
                continue
            self._set_aside(unreadable, step)
            return state, data_state
        if unreadable:
            raise CheckpointError(f"no restorable checkpoint in {self.directory}; the latest: {unreadable[0][1]}")
        return None

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """The params alone (latest step by default), onto the shardings of `abstract_params`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
        item, restore_args = _restore_args({"params": abstract_params})
        args = ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                   partial_restore=True)})
        return self._restore(step, args)[STATE]["params"]

    def _restore(self, step: int, args) -> Any:
        try:
            return self.manager.restore(step, args=args)
        except Exception as e:       # Orbax / TensorStore raise many types (ValueError, JSONDecodeError, OSError)
            raise self._unreadable(step, unreadable_file(self.step_dir(step), e), e) from None

    def _set_data_state(self, step: int, set_data_state: Callable[[Any], None], data_state: Any) -> None:
        try:
            if data_state is None:
                raise ValueError("the step holds no data iterator state")
            set_data_state(data_state)
        except Exception as e:       # whatever the iterator's or sampler's set_state raises on a bad state
            raise self._unreadable(step, os.path.join(self.step_dir(step), DATA, DATA_FILE), e) from None

    def _unreadable(self, step: int, path: str, error: BaseException) -> CheckpointError:
        return CheckpointError(f"checkpoint step {step} ({self.step_dir(step)}) is unreadable: {path}: "
                               f"{_reason(error)}")

    def _set_aside(self, unreadable: list[tuple[int, CheckpointError]], restored: int) -> None:
        """Moves each unreadable step to <step>.unreadable (process 0; never listed as a step again, so a
        later save of that step number succeeds) and logs one line for it."""
        for step, error in unreadable:
            aside = _free_name(self.step_dir(step) + ".unreadable")
            if jax.process_index() == 0:
                os.rename(self.step_dir(step), aside)
            logging.warning("%s; restored step %d instead (the unreadable step is kept as %s)", error, restored, aside)
        if unreadable:
            if jax.process_count() > 1:
                ocp.multihost.sync_global_processes("glmv_jax_checkpoint_set_aside")
            self.manager.reload()


def _free_name(path: str) -> str:
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def _chain(error: BaseException) -> list[BaseException]:
    """The error and its causes, outermost first."""
    out = [error]
    while (error.__cause__ or error.__context__) is not None and len(out) < 32:
        error = error.__cause__ or error.__context__
        out.append(error)
    return out


def _reason(error: BaseException) -> str:
    """The innermost cause's message, on one line (at most 300 characters)."""
    inner = _chain(error)[-1]
    text = " ".join(str(inner).split()) or type(inner).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _files(folder: str) -> list[str]:
    return sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)


def _is_json_file(path: str) -> bool:
    """Orbax's metadata files are JSON; array data (`d/` folders), OCDBT manifests and commit markers not."""
    return os.path.basename(os.path.dirname(path)) != "d" and not path.endswith((".ocdbt", ".txt"))


def _parses(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            json.loads(f.read())
        return True
    except ValueError:
        return False


def unreadable_file(folder: str, error: BaseException) -> str:
    """The file of step directory `folder` a failed restore points at: a JSON metadata file that does not
    parse, a file the error names, or the array data file of the size a TensorStore range error reports;
    else the folder itself."""
    files = _files(folder)
    for path in files:
        if _is_json_file(path) and not _parses(path):
            return path
    for e in _chain(error):
        name = getattr(e, "filename", None)
        if isinstance(name, str) and os.path.abspath(name).startswith(folder):
            return name
    sizes = [int(n) for n in re.findall(r"value of size (\d+)", " ".join(str(e) for e in _chain(error)))]
    matching = [p for p in files if not _is_json_file(p) and os.path.getsize(p) in sizes]
    return matching[0] if len(matching) == 1 else folder


def export_hf(config: Any, params: Any, out_dir: str | os.PathLike, **kwargs) -> list:
    """Writes an HF checkpoint (config.json + safetensors, tokenizer, chat template, processor configs)
    loadable by transformers; kwargs (tokenizer, processor, source, dtype, max_shard_size, ...) go to
    convert.hf.save_pretrained. Returns the weight files written."""
    return save_pretrained(config, params, os.fspath(out_dir), **kwargs)   # sharded arrays write in place
