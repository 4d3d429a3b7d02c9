"""Command line: ``python -m prism_lightning fit|validate|test|predict|select|pipeline``.

``main(args=None)`` wraps a ``LightningCLI`` so tests drive the real CLI in-process, e.g.
``main(["fit", "--config", "configs/tiny/warmup.yaml", "--trainer.fast_dev_run", "true"])``.
Every settings field's docstring is its ``--help`` line (``--model.help WarmupModule`` lists a
module's), and ``Literal`` choices are checked when the config is parsed.
"""

from __future__ import annotations

import os
import warnings

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

import prism_lightning.modules  # noqa: F401  (registers WarmupModule, GradientFeatureModule, ... for --model)
from prism_lightning.data.datamodule import PrismDataModule
from prism_lightning.trainer import PrismTrainer

PROG = "python -m prism_lightning"


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
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    return PrismCLI(
        model_class=None,
        datamodule_class=PrismDataModule,
        trainer_class=PrismTrainer,
        subclass_mode_model=True,
        auto_configure_optimizers=False,  # the modules build AdamW themselves (its moments feed the features)
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": PROG, "description": "PRISM: preference-aware influence-based data selection"},
    )


if __name__ == "__main__":
    main()
