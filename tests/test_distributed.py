"""Multi-process (gloo) checks of the data module: every rank serves the same selected subset."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_cli
from test_features import extract

from prism_lightning.influence.projection import ProjectionArgs


@pytest.mark.distributed
def test_ddp_ranks_serve_exactly_the_selection(warmed, small_data, tmp_path):
    extract(warmed, small_data, tmp_path, projection=ProjectionArgs(kind="sjlt", dim=256))
    sel = tmp_path / "selection"
    cmd = ["fit", "--config", "configs/tiny/finetune.yaml",
           "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
           "--trainer.logger", "false", "--trainer.limit_val_batches", "0",
           "--trainer.callbacks+=ddp_helpers.RecordTrainRows", f"--trainer.callbacks.out={tmp_path / 'rows'}",
           "--model.init_args.output_dir", str(tmp_path), "--data.pool", str(small_data["pool"]),
           "--data.target", str(small_data["target_pairs"]), "--data.selection_dir", str(sel),
           "--data.features_dir", str(tmp_path / "features"), "--data.selection_mode", "prism",
           "--data.selection.fraction", "0.25", "--data.batch_size", "4"]
    run_cli(cmd, extra_path=str(REPO / "tests"))
    selected = [json.loads(x)["id"] for x in (sel / "prism" / "selected.jsonl").read_text().splitlines()]
    pool = [json.loads(x)["id"] for x in small_data["pool"].read_text().splitlines()]
    want = sorted(pool.index(i) for i in selected)
    assert len(want) == 12
    ranks = [json.loads((tmp_path / "rows" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["served"] == ranks[1]["served"] == want
    assert sorted(set(ranks[0]["seen"]) | set(ranks[1]["seen"])) == want
