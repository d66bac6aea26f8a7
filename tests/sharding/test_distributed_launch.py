"""Multi-host start-up choices and the launch scripts' --dry-run output."""
import subprocess
from pathlib import Path

import pytest

from glmv_jax.sharding.distributed import cluster_kind, explicit_args

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_kind_and_explicit_args():
    assert cluster_kind({}) == "single"
    assert cluster_kind({"SLURM_JOB_ID": "7"}) == "auto"
    env = {"GLMV_COORDINATOR": "10.0.0.1:1234", "GLMV_NUM_PROCESSES": "4", "GLMV_PROCESS_ID": "3",
           "GLMV_LOCAL_DEVICE_IDS": "0,1"}
    assert cluster_kind(env) == "explicit"
    assert explicit_args(env) == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                                      local_device_ids=[0, 1])
    with pytest.raises(ValueError, match="GLMV_NUM_PROCESSES"):
        explicit_args({"GLMV_COORDINATOR": "h:1"})
    with pytest.raises(ValueError, match="outside"):
        explicit_args({**env, "GLMV_PROCESS_ID": "4"})


def test_launch_scripts_dry_run():
    tpu = subprocess.run(["bash", "launch/tpu_vm.sh", "--name", "pod", "--zone", "z1", "--config",
                          "experiments/configs/sft.py:model=glm41v_9b", "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "--worker=all" in tpu and "experiments.run" in tpu and "model=glm41v_9b" in tpu
    gpu = subprocess.run(["bash", "launch/gpu_cluster.sh", "--config", "experiments/configs/sft.py",
                          "--coordinator", "h0:1234", "--num-nodes", "2", "--node-rank", "1", "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "GLMV_PROCESS_ID=1" in gpu and "GLMV_NUM_PROCESSES=2" in gpu and "experiments.run" in gpu
    bad = subprocess.run(["bash", "launch/gpu_cluster.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
