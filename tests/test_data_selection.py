"""The data module computes the subset a fine-tune trains on (``data.selection``): the same files as ``select``,
on one process, two DDP processes and two FSDP2 processes; settings read from the stores; re-selection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, run_cli
from test_features import extract

from prism_lightning.cli import main
from prism_lightning.config import DataSelection, ProjectionArgs, SelectionArgs
from prism_lightning.data.formats import PoolIndex
from prism_lightning.errors import StoreMismatchError
from prism_lightning.influence.selection import choose
from prism_lightning.select import compute_scores, training_rows

FILES = ("scores.jsonl", "selected.jsonl", "weights.jsonl", "explain.jsonl", "manifest.json")
SELECTION = {"mode": "prism", "task": "repair", "fraction": 0.25}


@pytest.fixture(scope="module")
def stores(warmed, small_data, tmp_path_factory):
    """Feature stores of the small data at the shared warmup (3 pool shards of 16 rows)."""
    root = tmp_path_factory.mktemp("data-selection")
    dm = extract(warmed, small_data, root, shard_size=16, projection=ProjectionArgs(kind="sjlt", dim=256))
    return root, dm


def select_cli(root: Path, out: Path, *extra: str) -> None:
    main(["select", "--features", str(root / "features"), "--output_dir", str(out), "--modes", "[prism,less,loss]",
          "--selection.task", "repair", "--selection.fraction", "0.25", *extra])


def same_files(a: Path, b: Path) -> None:
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def fit_args(root: Path, small_data, out: Path, selection: dict) -> list[str]:
    return ["fit", "--config", "configs/tiny/finetune.yaml", "--trainer.max_epochs", "1", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
            "--trainer.callbacks+=ddp_helpers.RecordTrainRows", f"--trainer.callbacks.out={out / 'rows'}",
            "--model.init_args.output_dir", str(out), "--data.pool", str(small_data["pool"]),
            "--data.target", str(small_data["target_pairs"]), "--data.eval_sft", "null", "--data.eval_pairs", "null",
            "--data.batch_size", "4", "--data.selection", json.dumps(selection)]


def selected_rows(folder: Path) -> list[int]:
    return [i for i, line in enumerate((folder / "scores.jsonl").read_text().splitlines())
            if json.loads(line)["selected"]]


@pytest.mark.slow
def test_select_reads_its_settings_from_the_stores(stores, small_data, tmp_path):
    """No model, projection, preconditioner or data given: all come from the manifests; a conflict is refused."""
    root, _ = stores
    select_cli(root, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "prism" / "manifest.json").read_text())
    assert manifest["pool_rows"] == 48 and manifest["selected_rows"] == 36
    with pytest.raises(StoreMismatchError, match=r"projection.dim: recorded 256, now 512"):
        select_cli(root, tmp_path / "b", "--projection", '{"kind": "sjlt", "dim": 512}')
    with pytest.raises(StoreMismatchError, match=r"preconditioner: recorded 'adam_no_momentum', now 'identity'"):
        select_cli(root, tmp_path / "b", "--pool_preconditioner", "identity")
    with pytest.raises(StoreMismatchError, match=r"model: recorded '.*tiny-llama', now 'other/model'"):
        select_cli(root, tmp_path / "b", "--model", "other/model")
    with pytest.raises(StoreMismatchError, match="source_sha256"):  # other rows than the stores were made from
        select_cli(root, tmp_path / "b", "--pool", str(small_data["eval"]))
    model = json.loads((root / "features" / "epoch-1" / "pool" / "manifest.json").read_text())["model"]
    select_cli(root, tmp_path / "c", "--pool", str(small_data["pool"]), "--model", model)  # agreeing: accepted
    same_files(tmp_path / "a" / "prism", tmp_path / "c" / "prism")


@pytest.mark.slow
def test_select_help_lists_only_what_select_uses():
    out = subprocess.run([sys.executable, "-m", "prism_lightning", "select", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert "--features" in out and "--selection.task" in out and "--pool_preconditioner" in out
    assert "--trainer" not in out and "--data." not in out and "--model.init_args" not in out
    assert len([ln for ln in out.splitlines() if ln.strip().startswith("--")]) < 40
    top = subprocess.run([sys.executable, "-m", "prism_lightning", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    for command in ("select", "import-warmup", "curvature", "pipeline", "fit", "predict"):
        assert command in top


@pytest.mark.slow
def test_training_rows_reuse_refuse_and_force(stores, tmp_path):
    """The data module's path: computed once (same files as select), reused, refused with other settings."""
    root, dm = stores
    pool = PoolIndex.from_rows(dm.pool_rows, "harmful")
    sel = DataSelection(features=str(root / "features"), output_dir=str(tmp_path / "dm"), **SELECTION)
    rows = training_rows(sel, pool, dm.target_rows)
    select_cli(root, tmp_path / "cmd")
    same_files(tmp_path / "dm" / "prism", tmp_path / "cmd" / "prism")
    assert rows == selected_rows(tmp_path / "cmd" / "prism") and len(rows) == 36
    stamp = (tmp_path / "dm" / "prism" / "scores.jsonl").stat().st_mtime_ns
    assert training_rows(sel, pool, dm.target_rows) == rows  # reused, not rewritten
    assert (tmp_path / "dm" / "prism" / "scores.jsonl").stat().st_mtime_ns == stamp
    other = DataSelection(features=str(root / "features"), output_dir=str(tmp_path / "dm"),
                          **{**SELECTION, "fraction": 0.5})
    with pytest.raises(StoreMismatchError, match=r"selection.fraction: recorded 0.25, now 0.5"):
        training_rows(other, pool, dm.target_rows)
    other.force = True
    assert len(training_rows(other, pool, dm.target_rows)) == 24
    (tmp_path / "dm" / "prism" / "scores.jsonl").write_text("altered\n")
    with pytest.raises(StoreMismatchError, match="missing or altered"):
        training_rows(DataSelection(features=str(root / "features"), output_dir=str(tmp_path / "dm"),
                                    **{**SELECTION, "fraction": 0.5}), pool, dm.target_rows)


@pytest.mark.slow
def test_pi_override_at_one_checkpoint_equals_the_stores_pi(stores):
    """Re-selection's path (pi given) with the stores' own pi gives the stores' scores exactly."""
    root, dm = stores
    args = SelectionArgs(epochs=[2])
    scores, weights = compute_scores(root / "features", ["prism"], args, len(dm.pool_rows), dm.target_rows)
    again, _ = compute_scores(root / "features", ["prism"], args, len(dm.pool_rows), dm.target_rows,
                              pi=weights["epoch-2"])
    assert torch.equal(scores["prism"], again["prism"])


@pytest.mark.slow
def test_fit_computes_the_subset_it_trains_on(stores, small_data, tmp_path):
    """``fit --data.selection {...}`` with no select run before: trains on exactly select's rows, same files."""
    root, _ = stores
    out = tmp_path / "ft"
    sel = {**SELECTION, "features": str(root / "features"), "output_dir": str(out / "selection")}
    run_cli(fit_args(root, small_data, out, sel), extra_path=str(REPO / "tests"))
    select_cli(root, tmp_path / "cmd")
    same_files(out / "selection" / "prism", tmp_path / "cmd" / "prism")
    rows = json.loads((out / "rows" / "rank-0.json").read_text())
    assert rows["served"] == rows["seen"] == selected_rows(tmp_path / "cmd" / "prism")


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_select_the_same_rows_as_select(stores, small_data, tmp_path, strategy):
    """2 ranks (DDP, or FSDP2 on CPU): each scores its block of shards; both train on select's rows, same files."""
    root, _ = stores
    out = tmp_path / strategy
    sel = {**SELECTION, "features": str(root / "features"), "output_dir": str(out / "selection")}
    args = [*fit_args(root, small_data, out, sel), "--trainer.devices", "2", "--trainer.strategy", strategy,
            "--data.batch_size", "2"]
    run_cli(args, extra_path=str(REPO / "tests"), threads=1)
    select_cli(root, tmp_path / "cmd")
    same_files(out / "selection" / "prism", tmp_path / "cmd" / "prism")
    want = selected_rows(tmp_path / "cmd" / "prism")
    ranks = [json.loads((out / "rows" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["served"] == ranks[1]["served"] == want
    assert sorted(set(ranks[0]["seen"]) | set(ranks[1]["seen"])) == want


@pytest.mark.distributed
def test_select_under_torchrun_equals_one_process(stores, tmp_path):
    """``select`` on 2 processes (torchrun, gloo): byte-identical outputs to 1 process."""
    root, _ = stores
    select_cli(root, tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "prism_lightning", "select",
           "--features", str(root / "features"), "--output_dir", str(tmp_path / "two"), "--modes",
           "[prism,less,loss]", "--selection.task", "repair", "--selection.fraction", "0.25"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("prism: ") == 1, out.stdout  # one group: rank 0 alone reports (not 2 lone runs)
    for mode in ("prism", "less", "loss"):
        for name in FILES:
            one, two = tmp_path / "one" / mode / name, tmp_path / "two" / mode / name
            assert one.exists() == two.exists() and (not one.exists() or one.read_bytes() == two.read_bytes())


class RowsPerEpoch(L.Callback):
    def __init__(self):
        self.rows: dict[int, set[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.setdefault(trainer.current_epoch, set()).update(batch["index"].tolist())


@pytest.mark.slow
def test_reselection_recomputes_pi_at_the_current_model_and_retrains_on_its_rows(stores, small_data, tmp_path):
    """PrismReselection: pi from the model being trained (= a direct per-pair computation), the pool re-scored
    with it, the next epoch trained on exactly those rows, each change recorded."""
    from prism_lightning import TINY_MODEL
    from prism_lightning.callbacks import PrismReselection
    from prism_lightning.callbacks.reselection import target_log_likelihoods
    from prism_lightning.config import LoraArgs, OptimArgs
    from prism_lightning.data import PrismDataModule
    from prism_lightning.influence.objective import mean_logprob
    from prism_lightning.modules import FinetuneModule

    root, _ = stores
    sel = DataSelection(features=str(root / "features"), output_dir=str(tmp_path / "selection"), mode="prism",
                        task="forward", fraction=0.25)
    dm = PrismDataModule(tokenizer=TINY_MODEL, pool=str(small_data["pool"]), target=str(small_data["target_pairs"]),
                         eval_sft=None, eval_pairs=None, train_on="selection", selection=sel, batch_size=4,
                         max_length=64, eval_batch_size=5)
    seen, reselect = RowsPerEpoch(), PrismReselection(every=1)
    module = FinetuneModule(lora=LoraArgs(r=4, alpha=8, dropout=0.0), optim=OptimArgs(lr=3e-3),
                            output_dir=str(tmp_path), generate_eval=False)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, callbacks=[seen, reselect], default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    assert trainer.reload_dataloaders_every_n_epochs == 1
    assert seen.rows[0] == set(selected_rows(tmp_path / "selection" / "prism"))
    # pi at the trained model, directly: one pair at a time
    chosen, rejected = target_log_likelihoods(module, dm)
    ds, collate = dm.split_dataset("target")
    module.eval()
    for q in (0, 5, len(ds) - 1):
        batch = collate([ds[q]])
        with torch.no_grad():
            lbar = mean_logprob(module.model(input_ids=batch["input_ids"],
                                             attention_mask=batch["attention_mask"]).logits, batch["labels"])
        torch.testing.assert_close(torch.stack([chosen[q], rejected[q]]).float(), lbar.float(), rtol=1e-4, atol=1e-5)
    [record] = reselect.history  # one re-selection, after epoch 1 of 2
    assert record["epoch"] == 1 and record["rows"] == 12 == len(seen.rows[1])
    assert record["added"] == record["removed"] == len(seen.rows[1] - seen.rows[0])
    lines = (tmp_path / "reselection.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == reselect.history
    assert sorted(seen.rows[1]) == dm.train_rows  # the second epoch trained on the re-selected rows
    scores, _ = compute_scores(root / "features", ["prism"], SelectionArgs(task="forward", fraction=0.25), 48,
                               dm.target_rows, pi=torch.tensor(record["pi"], dtype=torch.float64))
    assert dm.train_rows == sorted(choose(scores["prism"], "forward", 0.25).nonzero().flatten().tolist())
