"""``PrismTrainer``: the Lightning ``Trainer`` plus the project's own subcommands."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from prism_lightning.pipeline import PipelineArgs
from prism_lightning.select import SelectionArgs, run_selection


class PrismTrainer(L.Trainer):
    """A ``Trainer`` whose extra methods become CLI subcommands (see ``extra_subcommands``)."""

    def __init__(self, *args, **kwargs):
        # kept so that pipeline stages can build trainers with the same hardware settings
        self.stage_kwargs = {k: v for k, v in kwargs.items()
                             if k in ("accelerator", "devices", "num_nodes", "strategy", "precision",
                                      "enable_progress_bar", "log_every_n_steps", "deterministic")}
        super().__init__(*args, **kwargs)

    @staticmethod
    def extra_subcommands() -> dict[str, set[str]]:
        """Subcommand name -> arguments the CLI fills from the config (like ``fit``'s model/datamodule)."""
        return {"select": {"model", "datamodule"}, "pipeline": {"model", "datamodule"}}

    def select(self, model: L.LightningModule, datamodule: L.LightningDataModule, modes: str = "prism",
               selection: SelectionArgs | None = None, force: bool = False) -> dict:
        """Score the pool from the feature stores of ``model`` (a ``GradientFeatureModule``) and select.

        Args:
            modes: comma-separated modes, e.g. ``prism,less,ifguide,random`` (each store read once).
            selection: budget and task (forward / repair); see ``SelectionArgs``.
            force: replace an existing selection made with other settings.
        """
        datamodule.load()
        root = Path(model.output_dir)
        summary = run_selection(root / "features", root / "selection", modes, selection or SelectionArgs(),
                                datamodule.pool_rows, datamodule.target_rows,
                                expected=model.scoring_expectations(), force=force)
        for mode, info in summary.items():
            if mode != "ranking_metrics":
                print(f"{mode}: {info['selected_rows']} rows -> {info['dir']}/selected.jsonl")
        return summary

    def pipeline(self, model: L.LightningModule, datamodule: L.LightningDataModule,
                 pipeline: PipelineArgs | None = None, output_dir: str | None = None, force: bool = False) -> dict:
        """Run warmup -> features -> select -> fine-tune -> evaluate -> report (see ``pipeline.py``).

        Args:
            pipeline: experiments, modes, seeds and stage settings (``PipelineArgs``).
            output_dir: run root (default: the model's ``output_dir``).
            force: redo every stage instead of skipping completed ones.
        """
        from prism_lightning.pipeline import run_pipeline

        report = run_pipeline(self, model, datamodule, output_dir, pipeline or PipelineArgs(), force=force)
        print(f"report: {report['report_md']}")
        return report
