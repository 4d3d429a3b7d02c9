"""Callbacks used by the multi-process tests (imported by the CLI in subprocesses)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class RecordTrainRows(L.Callback):
    """Writes the pool rows each rank trained on, and the subset its data module serves."""

    def __init__(self, out: str):
        self.out, self.seen = Path(out), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += batch["index"].tolist()

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"seen": sorted(set(self.seen)), "served": trainer.datamodule.train_indices()}
        (self.out / f"rank-{trainer.global_rank}.json").write_text(json.dumps(record))
