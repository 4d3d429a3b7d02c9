"""Callbacks that the fault suite injects into CLI runs (``--trainer.callbacks+=fault_helpers.X``)."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class SigtermAt(Callback):
    """Sends SIGTERM to this process at training batch ``batch`` of epoch ``epoch`` (how SLURM preempts)."""

    def __init__(self, epoch: int = 0, batch: int = 1):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


class StopAfterEpoch(Callback):
    """Stops training after epoch ``epoch`` (1-based) as a preempted job would, its checkpoint saved."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 == self.epoch:
            trainer.should_stop = True
