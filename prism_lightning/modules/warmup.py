"""``WarmupModule``: the LoRA/QLoRA warmup that produces the reference checkpoints theta_1..theta_K."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint

from prism_lightning.callbacks.adapter_checkpoint import ReferenceCheckpoint
from prism_lightning.modules.sft import SFTModule


class WarmupModule(SFTModule):
    """SFT on the warmup subset (``data.train_on: warmup``), saving ``warmup/epoch-N/`` each epoch.

    Each epoch folder holds the adapter, the Adam moments and ``checkpoint.json`` (see
    ``prism_lightning.callbacks.adapter_checkpoint``); Lightning checkpoints for ``--ckpt_path last``
    go to ``<output_dir>/warmup/lightning/``.
    """

    stage_dir = "warmup"

    def configure_callbacks(self):
        return [ReferenceCheckpoint(self.stage_dir),
                ModelCheckpoint(dirpath=str(Path(self.output_dir) / self.stage_dir / "lightning"),
                                filename="{epoch}", save_last=True, save_top_k=-1,
                                every_n_epochs=1)]
