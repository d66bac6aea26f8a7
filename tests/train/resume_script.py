"""A small training run for the kill-and-resume test (run as `python -m tests.train.resume_script ...`).

Trains the toy model with checkpoints every `--save-every` steps, resuming from the latest checkpoint in
`--workdir` (train state and data iterator). Writes "restored <step>" then one "<step> <loss as float hex>"
line per step to `--out`. With `--die-at-commit N` the process SIGKILLs itself at the moment Orbax commits
the step-N checkpoint (its temporary directory is fully written but not yet renamed).
"""

import argparse
import os
import signal

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from glmv_jax.train.checkpoint import Checkpointer  # noqa: E402
from glmv_jax.train.loop import restore_or_init, run_steps  # noqa: E402
from glmv_jax.train.state import abstract_train_state, train_state_from_params  # noqa: E402
from tests.train import toy  # noqa: E402


def build(workdir: str, save_every: int):
    """Everything a run needs; shared with the in-process reference in test_checkpoint.py."""
    opt, step_fn = toy.optimizer(), toy.train_step(dropout=0.1)
    params = toy.init_params()
    abstract = abstract_train_state(opt, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
    init = lambda: train_state_from_params(params, opt, jax.random.PRNGKey(0))
    ckpt = Checkpointer(os.path.join(workdir, "ckpt"), save_every=save_every, keep=2) if workdir else None
    return step_fn, abstract, init, ckpt


def die_at_commit(step: int) -> None:
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(src)).startswith(f"{step}.orbax-checkpoint-tmp"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(src, dst, *args, **kwargs)

    os.rename = rename


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save-every", type=int, required=True)
    parser.add_argument("--die-at-commit", type=int, default=None)
    args = parser.parse_args()
    if args.die_at_commit is not None:
        die_at_commit(args.die_at_commit)
    step_fn, abstract, init, ckpt = build(args.workdir, args.save_every)
    data = toy.data_iterator(seed=0)
    state = restore_or_init(ckpt, abstract, init, data)
    with open(args.out, "a", encoding="utf-8") as out:
        out.write(f"restored {int(state.step)}\n")
        out.flush()

        def log(step, metrics):
            out.write(f"{step} {float(metrics['loss']).hex()}\n")
            out.flush()

        run_steps(state, data, step_fn, num_steps=args.steps, checkpointer=ckpt, on_metrics=log)
    ckpt.close()


if __name__ == "__main__":
    main()
