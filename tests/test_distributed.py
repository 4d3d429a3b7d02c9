"""Multi-process (gloo) checks of the data module: every rank serves the same selected subset."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_cli
from test_features import extract

from prism_lightning.config import ProjectionArgs, SelectionArgs
from prism_lightning.data.formats import PoolIndex
from prism_lightning.select import run_selection


@pytest.mark.distributed
def test_ddp_ranks_serve_exactly_the_selection(warmed, small_data, tmp_path):
    dm = extract(warmed, small_data, tmp_path, projection=ProjectionArgs(kind="sjlt", dim=256))
    sel = tmp_path / "selection"
    run_selection(tmp_path / "features", sel, ["prism"], SelectionArgs(fraction=0.25),
                  PoolIndex.from_rows(dm.pool_rows), dm.target_rows)
    cmd = ["fit", "--config", "configs/tiny/finetune.yaml",
           "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
           "--trainer.logger", "false", "--trainer.limit_val_batches", "0",
           "--trainer.callbacks+=ddp_helpers.RecordTrainRows", f"--trainer.callbacks.out={tmp_path / 'rows'}",
           "--model.init_args.output_dir", str(tmp_path), "--data.pool", str(small_data["pool"]),
           "--data.target", str(small_data["target_pairs"]), "--data.selection", "null", "--data.selection_file",
           str(sel / "prism" / "selected.jsonl"), "--data.batch_size", "4"]
    run_cli(cmd, extra_path=str(REPO / "tests"))
    selected = [json.loads(x)["id"] for x in (sel / "prism" / "selected.jsonl").read_text().splitlines()]
    pool = [json.loads(x)["id"] for x in small_data["pool"].read_text().splitlines()]
    want = sorted(pool.index(i) for i in selected)
    assert len(want) == 12
    ranks = [json.loads((tmp_path / "rows" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["served"] == ranks[1]["served"] == want
    assert sorted(set(ranks[0]["seen"]) | set(ranks[1]["seen"])) == want


@pytest.mark.parametrize("n_rows,batch,world", [(48, 8, 2), (10, 4, 3), (5, 4, 2), (97, 8, 4)])
def test_global_batch_sampler_splits_the_single_process_batches(n_rows, batch, world):
    """W ranks with batch B see, step by step, the rows one process with batch W B sees (padded at the end)."""
    from prism_lightning.data.samplers import GlobalBatchSampler

    one = GlobalBatchSampler(n_rows, batch * world, seed=3)
    ranks = [GlobalBatchSampler(n_rows, batch, world, r, seed=3) for r in range(world)]
    for s in [one, *ranks]:
        s.set_epoch(1)
    single = list(one)
    per_rank = [list(s) for s in ranks]
    assert all(len(s) == len(rows) for s, rows in zip(ranks, per_rank))
    assert sorted(single) == list(range(n_rows))
    for step, start in enumerate(range(0, n_rows, batch * world)):
        got = [i for rows in per_rank for i in rows[step * batch:(step + 1) * batch]]
        want = single[start:start + batch * world]
        assert got[:len(want)] == want and set(got) <= set(single)
    ranks[0].set_epoch(2)
    assert list(ranks[0]) != per_rank[0]  # reshuffled each epoch
