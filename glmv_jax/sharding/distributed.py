"""Multi-host start-up through JAX's own distributed runtime.

`initialize_from_env()` picks, in order:
  1. an explicit coordinator: GLMV_COORDINATOR=host:port, GLMV_NUM_PROCESSES, GLMV_PROCESS_ID
     (and optionally GLMV_LOCAL_DEVICE_IDS=0,1,...), e.g. a GPU cluster without a scheduler;
  2. a cluster JAX detects by itself (TPU VM pods, SLURM, Open MPI, GKE): `jax.distributed.initialize()`;
  3. nothing: a single process (a laptop, one GPU box, a TPU VM with one host).
Process 0 ("host 0") writes logs and plots; checkpoints are coordinated by Orbax across processes.
"""

from __future__ import annotations

import os

import jax

_CLUSTER_MARKERS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def cluster_kind(env: dict | None = None) -> str:
    env = os.environ if env is None else env
    if env.get("GLMV_COORDINATOR"):
        return "explicit"
    if any(env.get(k) for k in _CLUSTER_MARKERS):
        return "auto"
    return "single"


def explicit_args(env: dict | None = None) -> dict:
    """jax.distributed.initialize arguments from the GLMV_* variables, with clear errors."""
    env = os.environ if env is None else env
    missing = [k for k in ("GLMV_NUM_PROCESSES", "GLMV_PROCESS_ID") if not env.get(k)]
    if missing:
        raise ValueError(f"GLMV_COORDINATOR is set but {missing} are not")
    args = dict(coordinator_address=env["GLMV_COORDINATOR"], num_processes=int(env["GLMV_NUM_PROCESSES"]),
                process_id=int(env["GLMV_PROCESS_ID"]))
    if not 0 <= args["process_id"] < args["num_processes"]:
        raise ValueError(f"GLMV_PROCESS_ID {args['process_id']} outside [0, {args['num_processes']})")
    if env.get("GLMV_LOCAL_DEVICE_IDS"):
        args["local_device_ids"] = [int(i) for i in env["GLMV_LOCAL_DEVICE_IDS"].split(",")]
    return args


def initialize_from_env() -> str:
    """Initializes jax.distributed when the environment describes several processes; returns the kind."""
    kind = cluster_kind()
    if kind == "explicit":
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):     # before any backend is touched
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**explicit_args())
    elif kind == "auto":
        jax.distributed.initialize()
    return kind


def is_host0() -> bool:
    return jax.process_index() == 0
