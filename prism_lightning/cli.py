"""Command line: ``python -m prism_lightning <command>``, the commands derived from ``stages.STAGES``.

``main(args=None)`` runs a command in-process so tests drive the real CLI, e.g.
``main(["fit", "--config", "configs/tiny/warmup.yaml", "--trainer.fast_dev_run", "true"])``. Lightning's
commands (``fit``, ``validate``, ``test``, ``predict``) and the ``PrismTrainer`` methods (``curvature``,
``pipeline``) run through a ``LightningCLI``; stand-alone commands (``select``, ``import-warmup``) have a
parser of their own settings only. ``python -m prism_lightning --help`` lists them all. Every settings
field's docstring is its ``--help`` line (``--model.help WarmupModule`` lists a module's), and ``Literal``
choices and each settings class's checks run when the config is parsed.

Failures a user can fix (bad data, bad settings, a store made from something else, a folder in
use) print one line, ``error: ...``, and exit with 2; ``--debug`` (or ``PRISM_DEBUG=1``) shows the
full traceback instead. A run stopped by SIGTERM (how SLURM preempts) exits with 143 after
Lightning's last checkpoint, so a scheduler requeues it and ``--ckpt_path last`` resumes it.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import traceback
import warnings
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

import prism_lightning.modules  # noqa: F401  (registers WarmupModule, GradientFeatureModule, ... for --model)
from prism_lightning.data.datamodule import PrismDataModule
from prism_lightning.errors import DataFormatError, LockedError, ProvenanceError, SettingsError, WriteError
from prism_lightning.io import run_lock
from prism_lightning.quiet import configure
from prism_lightning.stages import LIGHTNING_COMMANDS, STAGES, standalone_commands
from prism_lightning.trainer import PrismTrainer

PROG = "python -m prism_lightning"
DESCRIPTION = "PRISM: preference-aware influence-based data selection for LLM fine-tuning"
USER_ERRORS = (DataFormatError, SettingsError, ProvenanceError, LockedError, WriteError, FileNotFoundError)
SIGTERM_EXIT = 143  # 128 + SIGTERM: what schedulers read as "killed by SIGTERM"
SIGINT_EXIT = 130  # 128 + SIGINT (Ctrl+C)
INTERRUPTED = []  # set by the SIGINT handler: Lightning turns a KeyboardInterrupt into exit status 1


def _on_sigint(signum, frame):
    INTERRUPTED.append(signum)
    raise KeyboardInterrupt


def _on_sigterm(signum, frame):  # stand-alone commands: unwind (temporary files are removed) and exit 143
    raise SIGTERMException


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


class OneLineErrors:
    """A parser mixin: a settings check that failed is reported as its own message, on one line."""

    def error(self, message: str, ex: Exception | None = None):
        problem = settings_problem(message)
        if problem and not debug():
            self.print_usage(sys.stderr)
            sys.stderr.write(f"error: {problem}\n")
            sys.exit(2)
        if debug() and ex is not None:  # the traceback, whatever the jsonargparse release does with it
            traceback.print_exception(ex, file=sys.stderr)
        return super().error(message, ex)


class PrismParser(OneLineErrors, LightningArgumentParser):
    """The LightningCLI's parser, with one-line settings errors."""


class SettingsParser(OneLineErrors, ArgumentParser):
    """A stand-alone command's parser, with one-line settings errors."""


def parse_settings(cls: type, args: list[str] | None, command: str, description: str | None = None):
    """An instance of settings class ``cls`` from ``args`` (``--config FILE`` and one flag per field)."""
    parser = SettingsParser(prog=f"{PROG} {command}", description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of these settings.")
    parser.add_class_arguments(cls, nested_key=None, as_group=False)
    values = parser.instantiate(parser.parse_args(args)).as_dict()
    values.pop("config", None)
    return cls(**values)


def usage() -> str:
    """The top-level help: every command, from the stage table."""
    lines = [f"usage: {PROG} <command> [--config FILE] [settings]   ({PROG} <command> --help lists them)", "",
             DESCRIPTION, "", "stages, in pipeline order, and the command that runs each one alone:"]
    for spec in STAGES.values():
        how = f"{spec.command} --config {spec.config}" if spec.config else spec.command
        lines.append(f"  {spec.name:<14} {how:<46} {spec.summary}")
    lines += ["", "commands:",
              f"  {'pipeline':<14} every stage for every experiment and seed, then report.md and report.html",
              f"  {', '.join(LIGHTNING_COMMANDS):<30} Lightning's, with a stage's module as --model",
              *(f"  {name:<14} {spec.summary}" for name, spec in standalone_commands().items()),
              *(f"  {spec.command:<14} {spec.summary}" for spec in STAGES.values() if spec.kind == "trainer"),
              "", "errors a user can fix print one line and exit 2 (--debug: the traceback); SIGTERM exits 143;",
              "--verbose shows the libraries' own messages (Lightning, transformers, datasets, ...)"]
    return "\n".join(lines) + "\n"


class PrismCLI(LightningCLI):
    """LightningCLI with the trainer's subcommands (``curvature``, ``pipeline``), the model's tokenizer connected to
    the data module, and a lock per output folder."""

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

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        model_args = getattr(self.model, "model_args", None)
        if model_args is not None:  # the data module tokenizes with the model's tokenizer (data.tokenizer wins)
            self.datamodule.connect(tokenizer=model_args.name_or_path)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        """``--ckpt_path last`` resolved to the module's own ``last.ckpt``: Lightning looks for it before the
        module's ``configure_callbacks`` adds the checkpoint callback that knows where it is, and would start
        over with only a warning."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        own = hasattr(self.model, "last_checkpoint") and not any(  # a user's ModelCheckpoint: Lightning finds its own
            isinstance(c, ModelCheckpoint) for c in self.trainer.init_kwargs.get("callbacks") or [])
        if kwargs.get("ckpt_path") == "last" and own:
            found = self.model.last_checkpoint()
            if found is None:
                raise FileNotFoundError(f"--ckpt_path last: no last.ckpt of this run under {self.model.output_dir}; "
                                        "drop --ckpt_path to start the run")
            kwargs["ckpt_path"] = str(found)
        return kwargs

    def _run_subcommand(self, subcommand: str) -> None:
        folder = self.output_dir(subcommand)
        if folder is None or not self.trainer.is_global_zero:  # rank 0 holds the lock for every rank
            return super()._run_subcommand(subcommand)
        with run_lock(folder):
            super()._run_subcommand(subcommand)


def main(args: list[str] | None = None, run: bool = True):
    """Entry point of ``python -m prism_lightning`` and the ``prism-lightning`` script."""
    args = None if args is None else list(args)
    argv = sys.argv if args is None else args  # the flag is taken out of whichever list is parsed
    rest = argv[1:] if args is None else argv
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ["PRISM_DEBUG"] = "1"
    verbose = "--verbose" in argv
    if verbose:
        argv.remove("--verbose")
    configure(verbose)
    if not rest or rest[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return None
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    standalone = standalone_commands().get(rest[0])
    if standalone is not None:  # a parser of its own settings only
        return _guarded(lambda: standalone.main(rest[1:]), sigterm=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the feature writer reads row indices from each batch, not from the sampler
    warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices.*")
    return _guarded(lambda: PrismCLI(
            model_class=None,
            datamodule_class=PrismDataModule,
            trainer_class=PrismTrainer,
            subclass_mode_model=True,
            auto_configure_optimizers=False,  # the modules build AdamW themselves (its moments feed the features)
            parser_class=PrismParser,
            args=args,
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": PROG, "description": DESCRIPTION},
        ))


def _guarded(run, sigterm: bool = False):
    """``run()`` with the exits a scheduler and a user read: 143 after SIGTERM, 130 after SIGINT, 2 and one line for a
    mistake a user can fix (``--debug``: the traceback)."""
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, _on_sigint)}
    if sigterm:
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run()
    except SIGTERMException:
        sys.stderr.write("stopped by SIGTERM: rerun the same command to resume (fit: add --ckpt_path last); finished "
                         "stages, checkpoints and feature shards are kept\n")
        sys.exit(SIGTERM_EXIT)
    except KeyboardInterrupt:
        sys.stderr.write("stopped by SIGINT: rerun the same command to resume (finished work is kept)\n")
        sys.exit(SIGINT_EXIT)
    except SystemExit as err:
        if INTERRUPTED and err.code not in (0, None):  # Lightning's own exit after a KeyboardInterrupt
            sys.stderr.write("stopped by SIGINT: rerun the same command to resume (finished work is kept)\n")
            sys.exit(SIGINT_EXIT)
        raise
    except Exception as err:  # the user's own mistakes print one line; anything else keeps its traceback
        problem = user_problem(err)
        if problem is None or debug():
            raise
        sys.stderr.write(f"error: {problem}\n")
        sys.exit(2)
    finally:
        INTERRUPTED.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
