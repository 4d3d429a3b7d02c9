"""``StopOnSigterm``: a prediction stage stops within one batch of a SIGTERM (how SLURM preempts a job).

Lightning's fit and evaluation loops check ``trainer.received_sigterm``; its prediction loop does not,
so the feature and curvature stages would compute to the end. With this callback (after the store
writer, so a shard completed by the batch is written first) they raise ``SIGTERMException``; shards
already written stay valid (each is written atomically), and the CLI exits with 143. A rerun resumes.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException


class StopOnSigterm(L.Callback):
    def on_predict_batch_end(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.received_sigterm:
            raise SIGTERMException
