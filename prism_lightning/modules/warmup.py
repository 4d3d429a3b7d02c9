"""``WarmupModule``: the LoRA/QLoRA warmup that produces the reference checkpoints theta_1..theta_K."""

from __future__ import annotations

import lightning as L

from prism_lightning.callbacks.adapter_checkpoint import ReferenceCheckpoint
from prism_lightning.context import StageContext
from prism_lightning.modules.sft import SFTModule


class WarmupModule(SFTModule):
    """SFT on the warmup subset (``data.train_on: warmup``), saving ``warmup/epoch-N/`` each epoch.

    Each epoch folder holds the adapter, the Adam moments and ``checkpoint.json`` (see
    ``prism_lightning.callbacks.adapter_checkpoint``); Lightning checkpoints for ``--ckpt_path last``
    go to ``<output_dir>/warmup/lightning/``.
    """

    stage_dir = "warmup"

    def __init__(self, *args, force: bool = False, **kwargs):
        """``force``: replace the checkpoints of another warmup run in ``<output_dir>/warmup`` (refused otherwise);
        the other arguments are ``SFTModule``'s."""
        super().__init__(*args, **kwargs)
        self.force = force

    def configure_callbacks(self):
        return [*super().configure_callbacks(), ReferenceCheckpoint(self.stage_dir, force=self.force),
                *self.checkpoint_callbacks()]


# ----- as a pipeline stage ---------------------------------------------------------------------------------
def identity(ctx: StageContext) -> dict:
    """What the warmup of one experiment and seed is made of."""
    return dict(ctx.base, epochs=ctx.args.warmup_epochs)


def run(ctx: StageContext) -> None:
    """The warmup of one experiment and seed (a preempted one resumes from its last Lightning checkpoint)."""
    L.seed_everything(ctx.seed, verbose=False)
    last = ctx.root / "warmup" / "lightning" / "last.ckpt"
    # the stage is not done: what its folder holds is this stage's own, resumed from last.ckpt, or left over
    module = WarmupModule(model=ctx.model.model_args, lora=ctx.lora, optim=ctx.model.optim_args,
                          output_dir=str(ctx.root), fsdp=ctx.model.fsdp_args, force=not last.exists())
    trainer = ctx.trainer_for("warmup", max_epochs=ctx.args.warmup_epochs, enable_checkpointing=True)
    trainer.fit(module, datamodule=ctx.data_for(train_on="warmup"), ckpt_path=str(last) if last.exists() else None)
