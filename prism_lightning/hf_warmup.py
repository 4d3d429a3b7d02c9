"""Warmups done with the Hugging Face ``Trainer`` (TRL's ``SFTTrainer`` included) as reference checkpoints.

Two ways, both writing the ``epoch-N/`` folders our warmup writes (``callbacks.adapter_checkpoint``):

- ``python -m prism_lightning import-warmup --source DIR --dest OUT/warmup`` converts the ``checkpoint-*``
  folders a run saved (peft adapter, ``optimizer.pt``, ``trainer_state.json``), in step order, into
  ``epoch-1``, ``epoch-2``, ...: the adapter files are copied, AdamW's moments are keyed by parameter name,
  and the checkpoint's mean learning rate is the mean of the learning rates logged since the previous
  checkpoint (every step's with ``logging_steps=1``).
- ``PrismReferenceCallback(dest)`` in ``Trainer(callbacks=[...])`` writes them at the end of every epoch of
  the run itself, with every step's learning rate.

Parameter names come from the peft model built on the meta device (no weights are loaded). The
optimizer's state is matched to them in the order the ``Trainer`` builds its parameter groups (weights
with decay, then without), and every moment's shape is checked against its parameter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from transformers import TrainerCallback

from prism_lightning.callbacks.adapter_checkpoint import (
    RUN_FILE,
    adam_moments,
    claim_run_folder,
    moments_of,
    write_reference_checkpoint,
)
from prism_lightning.config import ModelArgs
from prism_lightning.errors import DataFormatError, StageMismatchError
from prism_lightning.io import read_json
from prism_lightning.modeling import model_digest
from prism_lightning.provenance import Manifest

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def checkpoint_folders(source: str | Path) -> list[Path]:
    """``checkpoint-<step>`` folders under ``source`` (or ``source`` itself), by step."""
    source = Path(source)
    found = sorted((p for p in source.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)),
                   key=lambda p: int(p.name.split("-")[1]))
    if not found and (source / "optimizer.pt").exists():
        found = [source]
    if not found:
        raise DataFormatError(f"{source}: no checkpoint-<step> folder with optimizer.pt; point --source at the "
                              "Trainer's output_dir (save_only_model must be false so the optimizer is saved)")
    for folder in found:
        missing = [f for f in (*ADAPTER_FILES, "optimizer.pt", "trainer_state.json") if not (folder / f).exists()]
        if missing:
            raise DataFormatError(f"{folder}: missing {missing}; a LoRA (peft) run saved by transformers.Trainer "
                                  "has them")
    return found


def trainable_names(adapter_dir: Path, base_model: str | None = None) -> dict[str, torch.Size]:
    """Trainable parameter names and shapes of base + adapter, in the ``Trainer``'s optimizer order."""
    from peft import PeftConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer

    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = False  # saved adapters say True, which would freeze the parameters being named
    base = base_model or config.base_model_name_or_path
    try:
        base_config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as err:
        raise DataFormatError(f"base model {base!r} (from {adapter_dir}/adapter_config.json, or --base_model) cannot "
                              f"be read ({type(err).__name__}); give --base_model a local model folder or a cached "
                              "hub id") from None
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(base_config), config)
    decay = set(Trainer.get_decay_parameter_names(None, model))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ordered = [(n, p) for n, p in params if n in decay] + [(n, p) for n, p in params if n not in decay]
    return {n: p.shape for n, p in ordered}


def hf_moments(optimizer_pt: Path, names: dict[str, torch.Size]) -> tuple[dict[str, torch.Tensor], dict]:
    """``{<name>.exp_avg, <name>.exp_avg_sq}`` from a saved AdamW state, and its first param group."""
    try:
        state = torch.load(str(optimizer_pt), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file (EOF, unpickling, zip errors)
        raise DataFormatError(f"{optimizer_pt} cannot be read ({type(err).__name__}: {err}); the checkpoint is "
                              "incomplete or damaged: save it again, or import without it") from None
    indices = [i for group in state["param_groups"] for i in group["params"]]
    if len(indices) != len(names):
        raise DataFormatError(f"{optimizer_pt}: the optimizer holds {len(indices)} parameters, the adapter has "
                              f"{len(names)} trainable ones; was it saved for another model or adapter?")
    out = {}
    for i, (name, shape) in zip(indices, names.items()):
        try:
            found = moments_of(state["state"].get(i) or {})
        except ValueError as err:
            raise DataFormatError(f"{optimizer_pt}: parameter {i} ({name}): {err}") from None
        if found is None:
            raise DataFormatError(f"{optimizer_pt}: no Adam moments for parameter {i} ({name}); only Adam/AdamW "
                                  "warmups (torch, or bitsandbytes' 8-bit, 32-bit and paged AdamW) can be imported")
        if found[0].shape != shape:
            raise DataFormatError(f"{optimizer_pt}: parameter {i} has shape {tuple(found[0].shape)}, but {name} "
                                  f"is {tuple(shape)}: the optimizer's order does not match the adapter's")
        out[f"{name}.exp_avg"], out[f"{name}.exp_avg_sq"] = found
    return out, state["param_groups"][0]


def step_learning_rates(folder: Path, previous: int, step: int) -> tuple[list[float], str]:
    """The learning rate of every optimizer step ``previous + 1 .. step`` of a Trainer run, and where it comes from.

    Rebuilt from the run's own schedule (``training_args.bin``: ``learning_rate``, ``lr_scheduler_type`` and its
    warmup, over ``trainer_state.json``'s ``max_steps``) and checked against every learning rate the run logged;
    without ``training_args.bin``, read from the log only if it holds every step. Refused otherwise: a guess
    would weight the checkpoint wrongly in every score.
    """
    state = read_json(folder / "trainer_state.json")
    # the Trainer logs at step s the rate step s trained with
    logged = {int(e["step"]): float(e["learning_rate"]) for e in state.get("log_history", [])
              if "learning_rate" in e and "step" in e}
    args_file = folder / "training_args.bin"
    if args_file.exists():
        from transformers import get_scheduler

        try:
            args = torch.load(str(args_file), map_location="cpu", weights_only=False)
        except Exception as err:
            raise DataFormatError(f"{args_file} cannot be read ({type(err).__name__}: {err})") from None
        total = int(state.get("max_steps") or step)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
        sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(total),
                              num_training_steps=total, scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
        rates = []
        for _ in range(step):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        wrong = [(s, logged[s], rates[s - 1]) for s in sorted(logged) if s <= step
                 and abs(logged[s] - rates[s - 1]) > 1e-9 * max(abs(logged[s]), 1e-12)]
        if wrong:
            s, want, got = wrong[0]
            raise DataFormatError(f"{args_file}: the schedule rebuilt from the run's arguments gives step {s} a "
                                  f"learning rate of {got:g}, but the run logged {want:g}; a custom scheduler cannot "
                                  "be rebuilt: log every step (logging_steps=1) or write the checkpoints with "
                                  "PrismReferenceCallback")
        return rates[previous:step], "schedule"
    missing = [s for s in range(previous + 1, step + 1) if s not in logged]
    if missing:
        raise DataFormatError(f"{folder}: no training_args.bin and no logged learning rate for steps {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}; the checkpoint's learning rate cannot be known: "
                              "keep training_args.bin with the checkpoints, or log every step (logging_steps=1)")
    return [logged[s] for s in range(previous + 1, step + 1)], "logged"


def _lora_info(adapter_dir: Path) -> dict:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    return {"r": cfg.get("r"), "alpha": cfg.get("lora_alpha"), "dropout": cfg.get("lora_dropout"),
            "target_modules": cfg.get("target_modules"), "enabled": True}


def import_warmup(source: str, dest: str, base_model: str | None = None, force: bool = False) -> list[Path]:
    """Convert a Trainer run's ``checkpoint-*`` folders under ``source`` into ``dest/epoch-N/`` (N = 1, 2, ...).

    All epochs or none: they are written into a temporary sibling of ``dest`` and put in place in one rename,
    with a ``run.json`` naming the import as one warmup run. A ``dest`` holding checkpoints is refused unless
    ``force``.

    Args:
        source: the Trainer's ``output_dir`` (or one checkpoint folder).
        dest: the warmup folder to write (e.g. ``runs/mine/warmup``); the feature stage reads it.
        base_model: the base model (default: the adapter config's ``base_model_name_or_path``).
        force: replace the checkpoints ``dest`` holds.
    """
    dest = Path(dest)
    folders = checkpoint_folders(source)
    refuse_used(dest, force)
    base = base_model or read_json(folders[0] / "adapter_config.json")["base_model_name_or_path"]
    names = trainable_names(folders[0], base)
    run = {"run_id": uuid.uuid4().hex, "imported_from": str(Path(source).resolve()),
           "base_model": {"name_or_path": base, "sha256": model_digest(ModelArgs(name_or_path=base))}}
    staging = dest.with_name(f".{dest.name}.importing-{os.getpid()}")
    previous, written = 0, []
    try:
        for epoch, folder in enumerate(folders, start=1):
            moments, group = hf_moments(folder / "optimizer.pt", names)
            step = int(read_json(folder / "trainer_state.json")["global_step"])
            lrs, lr_source = step_learning_rates(folder, previous, step)
            info = {"epoch": epoch, "lr_mean": sum(lrs) / len(lrs), "epoch_steps": step - previous, "global_step": step,
                    "model": {"name_or_path": base}, "lora": _lora_info(folder),
                    "betas": list(group["betas"]), "eps": group["eps"], "imported_from": str(folder),
                    "lr_source": lr_source, **{k: run[k] for k in ("run_id", "base_model")}}

            def copy_adapter(tmp: Path, folder=folder) -> Path:
                for name in ADAPTER_FILES:
                    shutil.copyfile(folder / name, tmp / name)
                return tmp / "adapter_model.safetensors"

            write_reference_checkpoint(staging / f"epoch-{epoch}", copy_adapter, moments, info)
            written.append(dest / f"epoch-{epoch}")
            previous = step
        Manifest(staging / RUN_FILE, run).write()
        refuse_used(dest, force)
        if dest.exists():
            trash = dest.with_name(f".{dest.name}.replaced-{os.getpid()}")
            os.replace(dest, trash)
            shutil.rmtree(trash)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def refuse_used(dest: Path, force: bool) -> None:
    """A warmup folder that holds checkpoints is replaced only with ``force``."""
    used = dest.exists() and (any(dest.glob("epoch-*")) or (dest / RUN_FILE).exists())
    if used and not force:
        raise StageMismatchError(f"{dest} already holds warmup checkpoints; the feature stage would mix them with "
                                 "the imported ones: use another --dest, or --force true to replace them")


class PrismReferenceCallback(TrainerCallback):
    """A ``transformers`` callback that writes ``<dest>/epoch-N/`` at the end of every epoch of a LoRA run
    (``Trainer``, TRL's ``SFTTrainer``): the adapter, AdamW's moments by parameter name, and the mean of the
    epoch's per-step learning rates. Single process or DDP (the main process writes). ``dest`` becomes this run's
    (``run.json``); one holding another run's checkpoints is refused unless ``force``."""

    def __init__(self, dest: str | Path, force: bool = False):
        self.dest, self.force = Path(dest), force
        self.run: dict | None = None
        self._lrs: list[float] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:  # only the main process writes checkpoints
            return
        record = Manifest.read(self.dest / RUN_FILE)
        if state.global_step > 0 and record is not None:  # a resumed run continues its own folder
            self.run = {k: record[k] for k in ("run_id", "base_model")}
            return
        base = model.peft_config["default"].base_model_name_or_path
        self.run = {"run_id": uuid.uuid4().hex,
                    "base_model": {"name_or_path": base, "sha256": model_digest(ModelArgs(name_or_path=base))}}
        claim_run_folder(self.dest, self.run, self.force)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._lrs = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._lrs.append(float(optimizer.param_groups[0]["lr"]))

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not state.is_world_process_zero:
            return
        epoch = round(state.epoch)
        names = {p: n for n, p in model.named_parameters() if p.requires_grad}
        group = optimizer.param_groups[0]
        info = {"epoch": epoch, "lr_mean": sum(self._lrs) / max(1, len(self._lrs)), "epoch_steps": len(self._lrs),
                "global_step": state.global_step,
                "model": {"name_or_path": model.peft_config["default"].base_model_name_or_path},
                "lora": {"r": model.peft_config["default"].r, "alpha": model.peft_config["default"].lora_alpha,
                         "dropout": model.peft_config["default"].lora_dropout, "enabled": True,
                         "target_modules": sorted(model.peft_config["default"].target_modules)},
                "betas": list(group["betas"]), "eps": group["eps"], **self.run}

        def save_adapter(tmp: Path) -> Path:
            model.save_pretrained(str(tmp))
            return tmp / "adapter_model.safetensors"

        write_reference_checkpoint(self.dest / f"epoch-{epoch}", save_adapter, adam_moments(optimizer, names), info)


def main(args: list[str] | None = None) -> list[Path]:
    """``python -m prism_lightning import-warmup --source DIR --dest OUT/warmup [--base_model ID]``."""
    from prism_lightning.cli import parse_settings
    from prism_lightning.config import ImportWarmupArgs

    settings = parse_settings(ImportWarmupArgs, args, "import-warmup", ImportWarmupArgs.__doc__)
    written = import_warmup(settings.source, settings.dest, settings.base_model, settings.force)
    for folder in written:
        print(f"wrote {folder}")
    return written
