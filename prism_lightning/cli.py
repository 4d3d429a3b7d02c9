"""Command line: ``python -m prism_lightning fit|validate|test|predict|select|pipeline``.

``main(args=None)`` wraps a ``LightningCLI`` so tests drive the real CLI in-process, e.g.
``main(["fit", "--config", "configs/tiny/warmup.yaml", "--trainer.fast_dev_run", "true"])``.
"""

from __future__ import annotations

import os
import warnings

from lightning.pytorch.cli import LightningCLI

from prism_lightning.data.datamodule import PrismDataModule
from prism_lightning.trainer import PrismTrainer


class PrismCLI(LightningCLI):
    """LightningCLI with the project's own subcommands (``select``, ``pipeline``)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        base = LightningCLI.subcommands()
        base.update(PrismTrainer.extra_subcommands())
        return base


def main(args: list[str] | None = None, run: bool = True) -> PrismCLI:
    """Entry point of ``python -m prism_lightning`` and the ``prism-lightning`` script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the feature writer reads row indices from each batch, not from the sampler
    warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices.*")
    return PrismCLI(
        model_class=None,
        datamodule_class=PrismDataModule,
        trainer_class=PrismTrainer,
        subclass_mode_model=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "PRISM: preference-aware influence-based data selection"},
    )


if __name__ == "__main__":
    main()
