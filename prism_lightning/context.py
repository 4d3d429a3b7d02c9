"""What a stage gets from the pipeline: ``StageContext`` (one experiment and seed), completion markers,
and trainers and data modules that inherit every setting of the pipeline's own.

``Stage`` skips, refuses or redoes a stage by its ``stage.json`` (a ``provenance.Manifest`` of the stage's
settings); ``stage_trainer`` builds a stage's ``Trainer`` from every setting of the pipeline's trainer,
overriding only what the stage must; ``stage_data`` does the same for the data module.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy

from prism_lightning.config import DataArgs, Experiment, LoraArgs, PipelineArgs, plain
from prism_lightning.errors import StageMismatchError
from prism_lightning.progress import Progress
from prism_lightning.provenance import Manifest, plain_json
from prism_lightning.ranks import is_rank0


class Stage:
    """``with Stage(folder, settings, force) as st: if st.todo: ...``: skip/refuse/redo by ``stage.json``."""

    def __init__(self, folder: Path, settings: dict, force: bool):
        self.folder, self.settings, self.force = Path(folder), plain_json(settings), force
        self.marker = self.folder / "stage.json"
        self.todo = True
        self.seconds = 0.0
        self.extra: dict = {}  # more for stage.json beside the settings and seconds (e.g. where a result came from)
        done = Manifest.read(self.marker)
        self.record: dict | None = done.data if done is not None else None  # the finished stage's stage.json
        if done is not None and not force:
            done.check({"settings": self.settings}, what=str(self.folder), error=StageMismatchError,
                       fix="use another output_dir, or --force to redo it")
            self.todo, self.seconds = False, done["seconds"]
        if self.todo and force and self.folder.exists() and is_rank0():
            shutil.rmtree(self.folder)

    def __enter__(self) -> Stage:
        self._start = time.time()
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None and self.todo:
            self.seconds = time.time() - self._start
        if exc_type is None and self.todo and is_rank0():
            Manifest(self.marker, {"settings": self.settings, "seconds": self.seconds, **self.extra}).write()


def stage_logger(logger, version: str):
    """The pipeline's logger for one stage: a copy writing to sub-run ``version`` when the logger has
    versions (CSV, TensorBoard); other loggers are shared by every stage; none stays none."""
    if logger in (None, False, True):
        return logger
    if isinstance(logger, (list, tuple)):
        return [stage_logger(one, version) for one in logger]
    if hasattr(logger, "_version"):
        logger = copy.deepcopy(logger)
        logger._version = version
        if hasattr(logger, "_experiment"):
            logger._experiment = None
    return logger


def stage_trainer(trainer: L.Trainer, folder: Path, version: str, **overrides) -> L.Trainer:
    """A new trainer of ``trainer``'s class with all its settings, writing under ``folder``.

    Callbacks, strategy objects and loggers are copied (a logger with versions writes to sub-run
    ``version``), the CLI's config-saving callback is left out, and ``overrides`` (the stage's epochs,
    checkpointing, inference mode...) replace the inherited values.
    """
    kwargs = dict(getattr(trainer, "init_kwargs", {}))
    callbacks = kwargs.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, (list, tuple)) else [callbacks]
    kwargs["callbacks"] = [copy.deepcopy(c) for c in callbacks if not isinstance(c, SaveConfigCallback)]
    kwargs["logger"] = stage_logger(kwargs.get("logger", True), version)
    if isinstance(kwargs.get("strategy"), Strategy):
        kwargs["strategy"] = copy.deepcopy(kwargs["strategy"])
    kwargs["default_root_dir"] = str(folder)
    kwargs |= overrides
    return type(trainer)(**kwargs)


def feature_overrides(trainer: L.Trainer, precision: str | None) -> dict:
    """A feature or curvature stage's trainer settings: gradients on, DDP instead of FSDP, optional precision."""
    out: dict = {"inference_mode": False}
    if isinstance(trainer.strategy, ModelParallelStrategy):
        out["strategy"] = "ddp"
    if precision:
        out["precision"] = precision
    return out


def data_settings(datamodule: DataArgs) -> dict:
    """The data module's settings as plain values (``config.DataArgs`` fields)."""
    return plain({f.name: getattr(datamodule, f.name) for f in fields(DataArgs)})


def stage_data(datamodule, **overrides):
    """A new data module of ``datamodule``'s class with all its settings and ``overrides``."""
    return replace(datamodule, **overrides)


@dataclass
class StageContext:
    """One experiment and seed of the pipeline, as each stage's ``run`` sees it.

    ``trainer``, ``model`` and ``datamodule`` are the pipeline's own (the CLI built them from the config):
    every stage copies their settings (``trainer_for``, ``data_for``) and overrides only what it must.
    ``base`` is what every stage of this experiment and seed is made of; ``identities`` holds each stage's
    identity (its ``stage.json`` settings) once computed, so a stage's identity extends its inputs';
    ``results`` collects the numbers stages report.
    """

    trainer: L.Trainer
    model: L.LightningModule
    datamodule: L.LightningDataModule
    args: PipelineArgs
    exp: Experiment
    seed: int
    root: Path
    force: bool = False
    data: dict = field(default_factory=dict)
    base: dict = field(default_factory=dict)
    lora: LoraArgs | None = None
    identities: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    progress: Progress = field(default_factory=lambda: Progress(0, enabled=False))
    sizes: dict = field(default_factory=dict)

    @property
    def version(self) -> str:
        return f"{self.exp.name}/seed-{self.seed}"

    @property
    def preconditioner(self) -> str:
        return self.exp.pool_preconditioner or self.args.pool_preconditioner

    def trainer_for(self, name: str, folder: Path | None = None, extra_callbacks: list | None = None,
                    **overrides) -> L.Trainer:
        """The pipeline trainer's settings for stage ``name`` (logger sub-run ``<exp>/seed-<s>/<name>``), with
        ``extra_callbacks`` after the user's."""
        trainer = stage_trainer(self.trainer, folder or self.root / name, f"{self.version}/{name}", **overrides)
        trainer.callbacks.extend(extra_callbacks or [])
        return trainer

    def data_for(self, **overrides):
        """This experiment's data module with ``overrides``, connected to the model's tokenizer."""
        dm = stage_data(self.datamodule, **{**self.data, **overrides})
        dm.connect(tokenizer=self.model.model_args.name_or_path)
        return dm
