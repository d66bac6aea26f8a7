#!/usr/bin/env bash
# Run an experiment on every worker of a Cloud TPU VM (single or multi-host pod slice).
#   launch/tpu_vm.sh --name my-v5p-64 --zone us-east5-a --config experiments/configs/sft.py:model=glm41v_9b [--dry-run]
# Each worker installs the package from this checkout (copied with scp) and starts the same command;
# JAX's TPU runtime finds the other hosts by itself (glmv_jax/sharding/distributed.py).
set -euo pipefail
NAME="" ZONE="" CONFIG="" WORKDIR="runs/tpu" DRY=0 PROJECT_FLAG="" EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2;;
    --zone) ZONE="$2"; shift 2;;
    --project) PROJECT_FLAG="--project=$2"; shift 2;;
    --config) CONFIG="$2"; shift 2;;
    --workdir) WORKDIR="$2"; shift 2;;
    --dry-run) DRY=1; shift;;
    *) EXTRA+=("$1"); shift;;
  esac
done
[[ -n "$NAME" && -n "$ZONE" && -n "$CONFIG" ]] || { echo "usage: $0 --name TPU --zone ZONE --config CFG [--workdir DIR] [--dry-run] [--config.x=y ...]" >&2; exit 2; }
run() { if [[ $DRY == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
SSH=(gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" $PROJECT_FLAG --worker=all)
run tar czf /tmp/glmv_jax_src.tgz --exclude=.git --exclude=runs --exclude=.venv .
run gcloud compute tpus tpu-vm scp /tmp/glmv_jax_src.tgz "$NAME":/tmp/ --zone "$ZONE" $PROJECT_FLAG --worker=all
run "${SSH[@]}" --command "mkdir -p ~/glmv_jax && tar xzf /tmp/glmv_jax_src.tgz -C ~/glmv_jax && cd ~/glmv_jax && pip install -q -e . 'jax[tpu]'"
run "${SSH[@]}" --command "cd ~/glmv_jax && python -m experiments.run --config=$CONFIG --workdir=$WORKDIR ${EXTRA[*]:-}"
