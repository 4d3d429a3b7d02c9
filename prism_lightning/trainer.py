"""``PrismTrainer``: the Lightning ``Trainer`` plus the project's own subcommands."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from prism_lightning.config import PipelineArgs, SelectionArgs
from prism_lightning.data.formats import PoolIndex, load_pairs, rows_digest
from prism_lightning.errors import SettingsError
from prism_lightning.influence.scoring import ModeName
from prism_lightning.pipeline import run_pipeline
from prism_lightning.select import run_selection

DEFAULT_SELECTION = SelectionArgs()  # never mutated (stages use ``dataclasses.replace``)


def selection_inputs(datamodule, selection: SelectionArgs) -> tuple[PoolIndex, list]:
    """The pool as a streamed index (subtasks, labels, digest; no tokenization) and the target pairs."""
    hp = datamodule.hparams
    pool = PoolIndex.scan(hp.pool, datamodule.cols, selection.label)
    return pool, (load_pairs(hp.target, datamodule.cols) if hp.target else [])


class PrismTrainer(L.Trainer):
    """A ``Trainer`` whose extra methods become CLI subcommands (see ``extra_subcommands``).

    It keeps the keyword arguments it was built with (``init_kwargs``), so that the pipeline's
    stages get trainers with every one of the user's settings (``stages.stage_trainer``).
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
        return {"select": {"model", "datamodule"}, "pipeline": {"model", "datamodule"},
                "curvature": {"model", "datamodule"}}

    def curvature(self, model: L.LightningModule, datamodule: L.LightningDataModule) -> list[str]:
        """Fit K-FAC/EK-FAC factors at every warmup checkpoint of ``model`` (a ``CurvatureModule``).

        Two passes over the warmup rows per checkpoint; writes ``epoch-N/curvature.safetensors``.
        """
        from prism_lightning.modules.curvature import CurvatureModule, fit_curvature

        if not isinstance(model, CurvatureModule):
            raise SettingsError(f"curvature needs --model CurvatureModule, not {type(model).__name__}")
        files = [str(f) for f in fit_curvature(self, model, datamodule)]
        for f in files:
            print(f"factors: {f}")
        return files

    def select(self, model: L.LightningModule, datamodule: L.LightningDataModule,
               modes: list[ModeName] | None = None, selection: SelectionArgs = DEFAULT_SELECTION,
               force: bool = False) -> dict:
        """Score the pool from the feature stores of ``model`` (a ``GradientFeatureModule``) and select.

        Args:
            modes: scoring modes, e.g. ``[prism,less,ifguide,random]`` (each store is read once for all).
            selection: budget and task (forward / repair).
            force: replace an existing selection made with other settings.
        """
        root = Path(model.output_dir)
        pool, targets = selection_inputs(datamodule, selection)
        expected = model.scoring_expectations(
            {"pool": pool.digest, "target": rows_digest(targets)}, datamodule.tokenization())
        summary = run_selection(root / "features", root / "selection", modes or ["prism"], selection, pool,
                                targets, expected=expected, force=force)
        for mode, info in summary.items():
            if mode != "ranking_metrics":
                print(f"{mode}: {info['selected_rows']} rows -> {info['dir']}/selected.jsonl")
        return summary

    def pipeline(self, model: L.LightningModule, datamodule: L.LightningDataModule,
                 pipeline: PipelineArgs | None = None, output_dir: str | None = None, force: bool = False) -> dict:
        """Run warmup -> features -> select -> fine-tune -> evaluate -> report (see ``prism_lightning.pipeline``).

        Args:
            pipeline: experiments, modes, seeds and stage settings (``--pipeline.help PipelineArgs`` lists them).
            output_dir: run root (default: the model's ``output_dir``).
            force: redo every stage instead of skipping completed ones.
        """
        report = run_pipeline(self, model, datamodule, output_dir, pipeline or PipelineArgs(), force=force)
        print(f"report: {report['report_md']} (to look at: {report['report_html']})")
        return report
