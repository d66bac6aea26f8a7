#!/usr/bin/env bash
# Run an experiment on a multi-node GPU cluster: one process per node, all local GPUs per process.
#   SLURM:    sbatch --nodes=4 --gpus-per-node=8 launch/gpu_cluster.sh --config experiments/configs/sft.py:model=glm41v_9b
#   explicit: launch/gpu_cluster.sh --coordinator host0:1234 --num-nodes 2 --node-rank 0 --config ... [--dry-run]
# Under SLURM, JAX detects the cluster itself; otherwise GLMV_COORDINATOR / GLMV_NUM_PROCESSES /
# GLMV_PROCESS_ID are exported for glmv_jax/sharding/distributed.py.
set -euo pipefail
CONFIG="" WORKDIR="runs/gpu" DRY=0 COORD="" NODES="" RANK="" EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2;;
    --workdir) WORKDIR="$2"; shift 2;;
    --coordinator) COORD="$2"; shift 2;;
    --num-nodes) NODES="$2"; shift 2;;
    --node-rank) RANK="$2"; shift 2;;
    --dry-run) DRY=1; shift;;
    *) EXTRA+=("$1"); shift;;
  esac
done
[[ -n "$CONFIG" ]] || { echo "usage: $0 --config CFG [--coordinator H:P --num-nodes N --node-rank R] [--dry-run]" >&2; exit 2; }
ENVS=(XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true")
if [[ -n "$COORD" ]]; then
  [[ -n "$NODES" && -n "$RANK" ]] || { echo "--coordinator needs --num-nodes and --node-rank" >&2; exit 2; }
  ENVS+=(GLMV_COORDINATOR="$COORD" GLMV_NUM_PROCESSES="$NODES" GLMV_PROCESS_ID="$RANK")
fi
CMD=(env "${ENVS[@]}" python -m experiments.run --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}")
if [[ -n "${SLURM_JOB_ID:-}" ]]; then CMD=(srun --ntasks-per-node=1 "${CMD[@]}"); fi
if [[ $DRY == 1 ]]; then printf '%q ' "${CMD[@]}"; echo; else exec "${CMD[@]}"; fi
