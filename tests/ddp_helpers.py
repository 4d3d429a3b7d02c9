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


def resident_mb() -> float:
    """This process's resident memory now (MB)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RecordModelMemory(L.Callback):
    """Writes each rank's resident memory before the model is built and its peak once it is sharded."""

    def __init__(self, out: str):
        self.out, self.before = Path(out), 0.0

    def setup(self, trainer, pl_module, stage):
        self.before = resident_mb()  # Lightning calls configure_model after this hook

    def on_train_start(self, trainer, pl_module):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank-{trainer.global_rank}.json").write_text(
            json.dumps({"before_mb": self.before, "peak_mb": peak}))
