"""What the pipeline needs to run stages: completion markers, stage trainers and rank helpers.

``Stage`` skips, refuses or redoes a stage by its ``stage.json``; ``stage_trainer`` builds a
stage's ``Trainer`` from every setting of the pipeline's trainer, overriding only what the stage
must; ``stage_data`` does the same for the data module.
"""

from __future__ import annotations

import copy
import inspect
import json
import shutil
import time
from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy

from prism_lightning.errors import StageMismatchError
from prism_lightning.io import atomic_write_text, json_digest


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Stage:
    """``with Stage(folder, settings, force) as st: if st.todo: ...``: skip/refuse/redo by ``stage.json``."""

    def __init__(self, folder: Path, settings: dict, force: bool):
        self.folder, self.settings, self.force = Path(folder), settings, force
        self.marker = self.folder / "stage.json"
        self.todo = True
        self.seconds = 0.0
        if self.marker.exists():
            done = json.loads(self.marker.read_text())
            if done["settings_digest"] == json_digest(settings) and not force:
                self.todo, self.seconds = False, done["seconds"]
            elif not force:
                raise StageMismatchError(f"{self.folder} was made with other settings; use another output_dir "
                                         "or --force to redo it")
        if self.todo and force and self.folder.exists():
            shutil.rmtree(self.folder)

    def __enter__(self) -> Stage:
        self._start = time.time()
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None and self.todo:
            self.seconds = time.time() - self._start
        if exc_type is None and self.todo and is_rank0():
            atomic_write_text(self.marker, json.dumps({"settings": self.settings, "seconds": self.seconds,
                                                       "settings_digest": json_digest(self.settings)},
                                                      indent=2, default=str))


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
    """The feature stage's trainer settings: gradients on, DDP instead of FSDP, optional precision."""
    out: dict = {"inference_mode": False}
    if isinstance(trainer.strategy, ModelParallelStrategy):
        out["strategy"] = "ddp"
    if precision:
        out["precision"] = precision
    return out


def data_settings(datamodule: L.LightningDataModule) -> dict:
    """The data module's settings: its init arguments as saved by ``save_hyperparameters``."""
    params = inspect.signature(type(datamodule).__init__).parameters
    return {k: v for k, v in datamodule.hparams.items() if k in params}


def stage_data(datamodule: L.LightningDataModule, **overrides) -> L.LightningDataModule:
    """A new data module of ``datamodule``'s class with all its settings and ``overrides``."""
    return type(datamodule)(**{**data_settings(datamodule), **overrides})
