"""``PrismTrainer``: the Lightning ``Trainer`` plus the project's own subcommands."""

from __future__ import annotations

import lightning as L


class PrismTrainer(L.Trainer):
    """A ``Trainer`` whose extra methods become CLI subcommands (see ``extra_subcommands``)."""

    @staticmethod
    def extra_subcommands() -> dict[str, set[str]]:
        """Subcommand name -> arguments the CLI fills from the config (like ``fit``'s model/datamodule)."""
        return {}
