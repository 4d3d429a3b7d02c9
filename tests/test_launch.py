"""The launch scripts and Lightning's cluster environments, with 2 CPU processes.

``tools/ops/launch/torchrun.sh`` runs under ``torchrun`` (TorchElasticEnvironment); the SLURM path
is simulated by starting the two tasks ``srun`` would start, with srun's variables
(SLURMEnvironment). Both train the tiny warmup with FSDP2 / DDP for one epoch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, run_processes
from test_multinode import free_port

pytestmark = pytest.mark.distributed


def tiny_warmup_args(small_data, out) -> list[str]:
    return ["--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--data.train_on", "pool", "--data.batch_size", "8",
            "--data.pool", str(small_data["pool"]), "--data.target", str(small_data["target_pairs"]),
            "--data.eval_sft", "null", "--data.eval_pairs", "null", "--model.init_args.output_dir", str(out)]


def check_one_epoch(out) -> None:
    info = json.loads((out / "warmup" / "epoch-1" / "checkpoint.json").read_text())
    assert info["global_step"] == 3  # 48 rows / (8 rows x 2 ranks)


def test_torchrun_script_fsdp(small_data, tmp_path):
    """Runs with an interpreter that is not on PATH (as from an unactivated venv): the script calls it directly."""
    env = dict(os.environ, NPROC="2", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               PYTHON=sys.executable, PATH="/usr/bin:/bin")
    out = subprocess.run(["bash", "tools/ops/launch/torchrun.sh", "fit", "configs/tiny/warmup.yaml",
                          "--trainer.strategy", "fsdp2", *tiny_warmup_args(small_data, tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    check_one_epoch(tmp_path)


def test_slurm_tasks_ddp(small_data, tmp_path):
    port = str(free_port())
    cmd = [sys.executable, "-m", "prism_lightning", "fit", "--config", "configs/tiny/warmup.yaml",
           "--trainer.num_nodes", "1", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           *tiny_warmup_args(small_data, tmp_path)]
    run_processes([(cmd, dict(os.environ, SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_PROCID=str(rank),
                              SLURM_LOCALID=str(rank), SLURM_NODEID="0", SLURM_JOB_NUM_NODES="1",
                              SLURM_JOB_NAME="prism", SLURM_JOB_ID="4242", SLURM_NODELIST="127.0.0.1",
                              MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
                   for rank in (0, 1)])
    check_one_epoch(tmp_path)
