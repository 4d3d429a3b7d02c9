"""A simulated 2-node run on localhost: one process per "node" (NODE_RANK 0 and 1, one device each)."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
from conftest import REPO, run_processes

from prism_lightning.store.feature_store import FeatureStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args: list[str]) -> None:
    port = str(free_port())
    argv = [sys.executable, "-m", "prism_lightning", *args, "--trainer.num_nodes", "2", "--trainer.devices", "1",
            "--trainer.strategy", "ddp"]
    run_processes([(argv, dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node),
                               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")) for node in (0, 1)])


@pytest.mark.distributed
def test_two_node_warmup_and_features(small_data, tmp_path):
    data = ["--data.pool", str(small_data["pool"]), "--data.target", str(small_data["target_pairs"])]
    two_nodes(["fit", "--config", "configs/tiny/warmup.yaml", "--trainer.max_epochs", "2",
               "--trainer.logger", "false", "--data.train_on", "pool", "--data.eval_sft", str(small_data["eval"]),
               "--data.eval_pairs", str(small_data["eval_pairs"]), "--model.init_args.output_dir", str(tmp_path),
               *data])
    assert sorted(p.name for p in (tmp_path / "warmup").glob("epoch-*")) == ["epoch-1", "epoch-2"]
    # 48 rows over 2 ranks = 24 per rank = 2 batches of 16 per epoch (a single process would take 3)
    assert json.loads((tmp_path / "warmup" / "epoch-2" / "checkpoint.json").read_text())["global_step"] == 4
    two_nodes(["predict", "--config", "configs/tiny/features.yaml", "--model.init_args.output_dir", str(tmp_path),
               "--model.init_args.checkpoint_dir", str(tmp_path / "warmup"), "--data.shard_size", "16", *data])
    for epoch in (1, 2):
        pool = FeatureStore(tmp_path / "features" / f"epoch-{epoch}" / "pool")
        assert pool.load("index").tolist() == list(range(48))
        target = FeatureStore(tmp_path / "features" / f"epoch-{epoch}" / "target")
        assert target.load("index").tolist() == list(range(12))
