"""Command line: ``python -m prism_lightning fit|validate|test|predict|curvature|select|pipeline|import-warmup``.

``main(args=None)`` wraps a ``LightningCLI`` so tests drive the real CLI in-process, e.g.
``main(["fit", "--config", "configs/tiny/warmup.yaml", "--trainer.fast_dev_run", "true"])``.
Every settings field's docstring is its ``--help`` line (``--model.help WarmupModule`` lists a
module's), and ``Literal`` choices and each settings class's checks run when the config is parsed.

Failures a user can fix (bad data, bad settings, a store made from something else, a folder in
use) print one line, ``error: ...``, and exit with 2; ``--debug`` (or ``PRISM_DEBUG=1``) shows the
full traceback instead. A run stopped by SIGTERM (how SLURM preempts) exits with 143 after
Lightning's last checkpoint, so a scheduler requeues it and ``--ckpt_path last`` resumes it.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
import warnings
from pathlib import Path

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

import prism_lightning.modules  # noqa: F401  (registers WarmupModule, GradientFeatureModule, ... for --model)
from prism_lightning.data.datamodule import PrismDataModule
from prism_lightning.errors import DataFormatError, LockedError, SettingsError, StageMismatchError, StoreMismatchError
from prism_lightning.io import run_lock
from prism_lightning.trainer import PrismTrainer

PROG = "python -m prism_lightning"
USER_ERRORS = (DataFormatError, SettingsError, StoreMismatchError, StageMismatchError, LockedError, FileNotFoundError)
SIGTERM_EXIT = 143  # 128 + SIGTERM: what schedulers read as "killed by SIGTERM"


def debug() -> bool:
    return os.environ.get("PRISM_DEBUG", "") not in ("", "0")


def settings_problem(text: str) -> str | None:
    """The message of a settings check inside jsonargparse's report of a value it could not use."""
    found = re.findall(r"SettingsError: (.+)", text)
    return found[-1].strip() if found else None


def user_problem(err: BaseException) -> str | None:
    """The message of the user's mistake behind ``err``: itself, or a cause it wraps (jsonargparse wraps)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, USER_ERRORS):
            return str(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class PrismParser(LightningArgumentParser):
    """The CLI's parser: a settings check that failed is reported as its own message, on one line."""

    def error(self, message: str, ex: Exception | None = None):
        problem = settings_problem(message)
        if problem and not debug():
            self.print_usage(sys.stderr)
            sys.stderr.write(f"error: {problem}\n")
            sys.exit(2)
        if debug() and ex is not None:  # the traceback, whatever the jsonargparse release does with it
            traceback.print_exception(ex, file=sys.stderr)
        return super().error(message, ex)


class PrismCLI(LightningCLI):
    """LightningCLI with the project's own subcommands (``select``, ``pipeline``) and a lock per output folder."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        base = LightningCLI.subcommands()
        base.update(PrismTrainer.extra_subcommands())
        return base

    def before_instantiate_classes(self) -> None:
        """``trainer.default_root_dir`` follows the model's ``output_dir`` unless set: one folder per run holds
        its outputs, Lightning's checkpoints and the saved config."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        init = config.get("model.init_args") if "model.init_args" in config else None
        # the run's folder: pipeline's output_dir, else the model's (the curvature stage writes into checkpoint_dir)
        folder = config.get("output_dir") or (init and (init.get("output_dir") or init.get("checkpoint_dir")))
        if config.get("trainer.default_root_dir") is None and folder:
            config["trainer.default_root_dir"] = folder

    def output_dir(self, subcommand: str) -> Path | None:
        """The folder this run writes to: ``--output_dir`` of ``pipeline``, else the model's ``output_dir``."""
        chosen = (self.config_init.get(subcommand) or {}).get("output_dir") if subcommand == "pipeline" else None
        folder = chosen or getattr(self.model, "output_dir", None)
        return Path(folder) if folder else None

    def _run_subcommand(self, subcommand: str) -> None:
        folder = self.output_dir(subcommand)
        if folder is None or not self.trainer.is_global_zero:  # rank 0 holds the lock for every rank
            return super()._run_subcommand(subcommand)
        with run_lock(folder):
            super()._run_subcommand(subcommand)


def main(args: list[str] | None = None, run: bool = True) -> PrismCLI:
    """Entry point of ``python -m prism_lightning`` and the ``prism-lightning`` script."""
    args = None if args is None else list(args)
    argv = sys.argv if args is None else args  # the flag is taken out of whichever list is parsed
    rest = argv[1:] if args is None else argv
    if rest[:1] == ["import-warmup"]:  # not a Trainer stage: converts a Hugging Face Trainer's checkpoints
        from prism_lightning.hf_warmup import main as import_main

        try:
            return import_main(rest[1:])
        except USER_ERRORS as err:
            if debug():
                raise
            sys.stderr.write(f"error: {err}\n")
            sys.exit(2)
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ["PRISM_DEBUG"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the feature writer reads row indices from each batch, not from the sampler
    warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices.*")
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        return PrismCLI(
            model_class=None,
            datamodule_class=PrismDataModule,
            trainer_class=PrismTrainer,
            subclass_mode_model=True,
            auto_configure_optimizers=False,  # the modules build AdamW themselves (its moments feed the features)
            parser_class=PrismParser,
            args=args,
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": PROG, "description": "PRISM: preference-aware influence-based data selection"},
        )
    except SIGTERMException:
        sys.stderr.write("stopped by SIGTERM: resume with --ckpt_path last (finished stages are kept)\n")
        sys.exit(SIGTERM_EXIT)
    except Exception as err:  # the user's own mistakes print one line; anything else keeps its traceback
        problem = user_problem(err)
        if problem is None or debug():
            raise
        sys.stderr.write(f"error: {problem}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
