"""The stages, in one table: the CLI's subcommands, the pipeline's order and the config tests come from it.

A row names a stage, the command that runs it on its own (one of Lightning's, ``fit``/``predict``, with the
stage's module as ``--model``; a ``Trainer`` method; or a stand-alone parser), the class whose fields are
its settings, the folders it reads and writes (relative to a run), its tiny config, and how the pipeline
runs it for one experiment and seed: ``identity(ctx)`` (the settings its ``stage.json`` records; a stage
whose identity is None keeps one marker per run itself), ``run(ctx)``, ``needed(ctx)`` and ``collect(ctx)``
(the numbers it reports). Rows are in pipeline order.

Adding a stage: its module (settings, ``run``, ``identity``), one row here, and its test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prism_lightning import hf_warmup, select
from prism_lightning.config import ImportWarmupArgs, SelectArgs
from prism_lightning.modules import curvature, features, finetune, warmup

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


@dataclass(frozen=True)
class StageSpec:
    """One stage (see the module doc)."""

    name: str
    command: str
    summary: str
    settings: type
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    config: str | None = None
    folder: str | None = None
    identity: Callable | None = None
    run: Callable | None = None
    needed: Callable | None = None
    collect: Callable | None = None
    method: Callable | None = None
    main: Callable | None = None

    @property
    def kind(self) -> str:
        """``lightning`` (one of Lightning's commands), ``trainer`` (a ``PrismTrainer`` method) or ``standalone``."""
        if self.main is not None:
            return "standalone"
        return "trainer" if self.method is not None else "lightning"

    @property
    def in_pipeline(self) -> bool:
        return self.run is not None


STAGES: dict[str, StageSpec] = {s.name: s for s in [
    StageSpec("warmup", "fit", "LoRA/QLoRA SFT on a seeded slice of the pool; a reference checkpoint per epoch",
              warmup.WarmupModule, ("data.pool",), ("warmup/epoch-N/",), "configs/tiny/warmup.yaml", "warmup",
              warmup.identity, warmup.run),
    StageSpec("import-warmup", "import-warmup", "reference checkpoints from a Hugging Face Trainer / TRL run",
              ImportWarmupArgs, ("<trainer run>/checkpoint-*/",), ("warmup/epoch-N/",), main=hf_warmup.main),
    StageSpec("curvature", "curvature", "K-FAC/EK-FAC factors of the LoRA layers at each warmup checkpoint",
              curvature.CurvatureModule, ("warmup/epoch-N/", "data.pool"), ("warmup/epoch-N/curvature.safetensors",),
              "configs/tiny/curvature.yaml", "curvature", curvature.identity, curvature.run, curvature.needed,
              method=curvature.command),
    StageSpec("features", "predict", "per-example LoRA gradient features of the pool and the target pairs",
              features.GradientFeatureModule, ("warmup/epoch-N/", "data.pool", "data.target"),
              ("features/epoch-N/{pool,target}/",), "configs/tiny/features.yaml", "features", features.identity,
              features.run),
    StageSpec("select", "select", "scores, subsets and explanations of every mode from the feature stores",
              SelectArgs, ("features/epoch-N/",), ("selection/<mode>/",), "configs/tiny/select.yaml", "selection",
              select.identity, select.run, collect=select.collect, main=select.main),
    StageSpec("finetune", "fit", "fine-tune on a selection (data.selection computes it), then `test` evaluates it",
              finetune.FinetuneModule, ("selection/<mode>/ or features/", "data.pool"), ("finetune/<run>/",),
              "configs/tiny/finetune.yaml", "finetune", None, finetune.run, finetune.needed),
]}


def pipeline_stages() -> list[StageSpec]:
    """The pipeline's stages, in order."""
    return [s for s in STAGES.values() if s.in_pipeline]


def trainer_commands() -> dict[str, Callable]:
    """Subcommands that are ``PrismTrainer`` methods (``curvature``), besides ``pipeline``."""
    return {s.command: s.method for s in STAGES.values() if s.kind == "trainer"}


def standalone_commands() -> dict[str, StageSpec]:
    """Subcommands with their own parser (``select``, ``import-warmup``): they list only their own settings."""
    return {s.command: s for s in STAGES.values() if s.kind == "standalone"}
