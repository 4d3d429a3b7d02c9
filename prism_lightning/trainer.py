"""``PrismTrainer``: the Lightning ``Trainer`` plus the project's own subcommands (``curvature``, ``pipeline``).

The methods come from the stage table (``stages.trainer_commands``) and the pipeline's command; the CLI
makes each one a subcommand with the model, data and trainer settings of ``fit``.
"""

from __future__ import annotations

import lightning as L

from prism_lightning.pipeline import command as pipeline_command
from prism_lightning.stages import trainer_commands


class PrismTrainer(L.Trainer):
    """A ``Trainer`` whose extra methods become CLI subcommands (see ``extra_subcommands``).

    It keeps the keyword arguments it was built with (``init_kwargs``), so that the pipeline's
    stages get trainers with every one of the user's settings (``context.stage_trainer``).
    """

    def __init__(self, *args, **kwargs):
        if args:
            raise TypeError("PrismTrainer takes keyword arguments only (so the pipeline can copy them)")
        self.init_kwargs = dict(kwargs)
        callbacks = kwargs.get("callbacks")
        if isinstance(callbacks, (list, tuple)):  # Trainer extends the list it is given with its own defaults
            self.init_kwargs["callbacks"] = list(callbacks)
        super().__init__(**kwargs)

    @staticmethod
    def extra_subcommands() -> dict[str, set[str]]:
        """Subcommand name -> arguments the CLI fills from the config (like ``fit``'s model/datamodule)."""
        return {name: {"model", "datamodule"} for name in (*trainer_commands(), "pipeline")}


for _name, _method in {**trainer_commands(), "pipeline": pipeline_command}.items():
    setattr(PrismTrainer, _name, _method)
