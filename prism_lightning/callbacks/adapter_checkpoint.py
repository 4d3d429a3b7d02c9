"""Per-epoch reference checkpoints: adapter, Adam moments and the epoch's mean learning rate.

Layout of ``<output_dir>/<subdir>/epoch-N/`` (N = 1, 2, ...):

- ``adapter_config.json``, ``adapter_model.safetensors``: the peft adapter (``save_pretrained``);
  for a full fine-tune, ``model.safetensors`` with the trainable weights instead.
- ``optimizer.safetensors``: ``<param name>.exp_avg`` and ``<param name>.exp_avg_sq`` (AdamW's m and
  v) for every trainable parameter, names as in ``model.named_parameters()``.
- ``checkpoint.json``: epoch, ``lr_mean`` (mean LR over the epoch's steps), steps, model id,
  LoRA settings, Adam betas/eps, the warmup run's id and base model, and the sha256 of the adapter
  and optimizer files (written last: its presence marks a complete checkpoint). The folder is
  written under a temporary name and renamed into place.

``<output_dir>/<subdir>/run.json`` names the one warmup run whose checkpoints the folder holds (its
id and base model): a new run into a folder holding another run's checkpoints is refused, or with
``force`` the old folder is replaced in one rename; a resumed run keeps its id (callback state).
Readers check every file against ``checkpoint.json`` by content (``check_checkpoint``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from prism_lightning import __version__
from prism_lightning.errors import StageMismatchError, StoreCorruptError
from prism_lightning.io import atomic_folder, file_sha256
from prism_lightning.modeling import model_digest, trainable_named_parameters
from prism_lightning.provenance import Manifest
from prism_lightning.sharding import full_tensor, gather_trainable

RUN_FILE = "run.json"


BNB_STATE = "__bnb_optimizer_quant_state__"  # where bitsandbytes' state_dict keeps its optimizers' moments
BNB_BLOCKS = (64, 128, 256, 512, 1024, 2048, 4096)


def _bnb_dequantized(state: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """A bitsandbytes 8-bit blockwise state as float32 (its block size follows from the number of blocks)."""
    import bitsandbytes.functional as F

    blocksize = next(b for b in BNB_BLOCKS if b * absmax.numel() >= state.numel())
    return F.dequantize_blockwise(state, absmax=absmax.float(), code=code.float(), blocksize=blocksize).float()


def moments_of(state: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Adam's first and second moments of one parameter's optimizer state, as float32: ``torch.optim.Adam(W)``
    (``exp_avg``/``exp_avg_sq``) or bitsandbytes' AdamW 8-bit, 32-bit and paged variants (``state1``/``state2``,
    dequantized when 8-bit; live or from a saved ``state_dict``). None when the state holds no Adam moments."""
    if "exp_avg" in state:
        return state["exp_avg"].float(), state["exp_avg_sq"].float()
    q = state.get(BNB_STATE, state)
    if "state1" not in q or "state2" not in q:
        return None
    m, v = q["state1"], q["state2"]
    if m.dtype == torch.uint8:
        if "absmax1" not in q:
            raise ValueError("a bitsandbytes 8-bit optimizer state without block-wise quantization (block_wise=False) "
                             "cannot be read; use the default block-wise 8-bit optimizers")
        m, v = _bnb_dequantized(m, q["absmax1"], q["qmap1"]), _bnb_dequantized(v, q["absmax2"], q["qmap2"])
    return m.float(), v.float()


def adam_moments(optimizer: torch.optim.Optimizer, names: dict) -> dict[str, torch.Tensor]:
    """``{name.exp_avg, name.exp_avg_sq}`` for each parameter the optimizer holds Adam state for (``moments_of``).

    Under FSDP the moments are sharded ``DTensor``s: this gathers them, so every rank must call it.
    """
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            found = moments_of(optimizer.state.get(p, {})) if p in names else None
            if found is not None:
                for key, t in zip(("exp_avg", "exp_avg_sq"), found):
                    out[f"{names[p]}.{key}"] = full_tensor(t.detach()).float().cpu().contiguous()
    return out


def save_trainable(model, weights: dict[str, torch.Tensor], folder: Path, tokenizer=None) -> Path:
    """Write gathered trainable weights so that one call loads them, with the tokenizer beside them: a peft adapter
    (``PeftModel.from_pretrained``), or a full fine-tune's whole model (``AutoModelForCausalLM.from_pretrained``:
    ``config.json`` and one ``model.safetensors``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    if hasattr(model, "save_pretrained") and hasattr(model, "peft_config"):
        model.save_pretrained(str(folder), state_dict=weights)
        return folder / "adapter_model.safetensors"
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(str(folder), state_dict=weights, max_shard_size="1000GB")
        return folder / "model.safetensors"
    save_file(weights, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


def save_reference_checkpoint(module, optimizer, folder: Path, info: dict, write: bool = True) -> Path:
    """Write one complete checkpoint folder atomically (temp folder + rename).

    Every rank calls this (gathering sharded weights and moments is collective); ``write`` is
    true on the one rank that writes.
    """
    folder = Path(folder)
    model = module.model
    names = {p: n for n, p in trainable_named_parameters(model).items()}
    weights, moments = gather_trainable(model), adam_moments(optimizer, names)
    if not write:
        return folder
    tokenizer = getattr(module, "tokenizer", None)
    return write_reference_checkpoint(folder, lambda tmp: save_trainable(model, weights, tmp, tokenizer), moments, info)


def write_reference_checkpoint(folder: Path, write_weights, moments: dict[str, torch.Tensor], info: dict) -> Path:
    """The one writer of ``epoch-N/``: ``write_weights(tmp) -> weights file``, Adam moments keyed by parameter
    name (``<name>.exp_avg``/``.exp_avg_sq``), and ``checkpoint.json`` (``info`` plus the weights' sha256),
    atomically."""
    with atomic_folder(folder) as tmp:
        path = write_weights(tmp)
        info = dict(info, adapter_file=path.name, adapter_sha256=file_sha256(path), package_version=__version__)
        if moments:
            save_file({k: v.contiguous() for k, v in moments.items()}, str(tmp / "optimizer.safetensors"))
            info["optimizer_sha256"] = file_sha256(tmp / "optimizer.safetensors")
        (tmp / "checkpoint.json").write_text(json.dumps(info, indent=2))
    return Path(folder)


def check_checkpoint(folder: Path, info: dict) -> None:
    """The adapter and optimizer files of a checkpoint are the ones its ``checkpoint.json`` records (sha256
    computed here)."""
    files = {info.get("adapter_file", "adapter_model.safetensors"): info.get("adapter_sha256"),
             "optimizer.safetensors": info.get("optimizer_sha256")}
    for name, digest in files.items():
        if digest is None:
            continue
        path = Path(folder) / name
        if not path.exists() or file_sha256(path) != digest:
            raise StoreCorruptError(f"{path} is missing or altered (its sha256 differs from {folder}/checkpoint.json); "
                                    "rerun the warmup (or import-warmup) that wrote it")


def claim_run_folder(folder: Path, run: dict, force: bool) -> None:
    """Make ``folder`` the warmup run ``run``'s (``run_id``, ``base_model``): a folder holding another run's
    checkpoints is refused, or with ``force`` replaced in one rename (the old one is then deleted)."""
    folder = Path(folder)
    record = Manifest.read(folder / RUN_FILE)
    if record is not None and record.get("run_id") == run["run_id"]:
        return  # this run, resumed
    old = sorted(p.name for p in folder.glob("epoch-*")) if folder.exists() else []
    if record is not None or old:
        if not force:
            what = f"run {record.get('run_id')}" if record is not None else "an earlier run"
            raise StageMismatchError(f"{folder} holds the checkpoints of another warmup ({what}: "
                                     f"{', '.join(old) or 'no epochs yet'}); the feature stage would mix them with "
                                     "this run's: use another output_dir, or force: true to replace them")
        trash = folder.with_name(f".{folder.name}.replaced-{os.getpid()}")
        os.replace(folder, trash)
        shutil.rmtree(trash)
    folder.mkdir(parents=True, exist_ok=True)
    Manifest(folder / RUN_FILE, dict(run, started=time.strftime("%Y-%m-%d %H:%M:%S"))).write()


class ReferenceCheckpoint(L.Callback):
    """Saves ``<output_dir>/<subdir>/epoch-N/`` at the end of every training epoch (rank 0).

    ``force``: replace a folder holding another warmup run's checkpoints (otherwise refused at fit start).
    """

    def __init__(self, subdir: str = "warmup", force: bool = False):
        self.subdir, self.force = subdir, force
        self.run: dict | None = None
        self._lr_sum = 0.0
        self._lr_steps = 0

    def state_dict(self) -> dict:
        return {"run": self.run}

    def load_state_dict(self, state: dict) -> None:
        self.run = state.get("run")  # a resumed run keeps its id

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        """Claim the folder once a resumed run's state is restored (under FSDP that is after ``on_fit_start``)."""
        if trainer.fast_dev_run:
            return
        if self.run is None:
            run = {"run_id": uuid.uuid4().hex, "base_model": {"name_or_path": pl_module.model_args.name_or_path,
                                                             "sha256": model_digest(pl_module.model_args)}}
            self.run = trainer.strategy.broadcast(run, src=0)
        if trainer.is_global_zero:
            claim_run_folder(Path(pl_module.output_dir) / self.subdir, self.run, self.force)
        trainer.strategy.barrier("warmup-run-folder")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        self._lr_sum, self._lr_steps = 0.0, 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        self._lr_sum += trainer.optimizers[0].param_groups[0]["lr"]
        self._lr_steps += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        epoch = trainer.current_epoch + 1
        opt = trainer.optimizers[0]
        info = {"epoch": epoch, "lr_mean": self._lr_sum / max(1, self._lr_steps),
                "epoch_steps": self._lr_steps, "global_step": trainer.global_step,
                "model": asdict(pl_module.model_args), "lora": asdict(pl_module.lora_args),
                "betas": list(opt.param_groups[0]["betas"]), "eps": opt.param_groups[0]["eps"], **self.run}
        folder = Path(pl_module.output_dir) / self.subdir / f"epoch-{epoch}"
        save_reference_checkpoint(pl_module, opt, folder, info, write=trainer.is_global_zero)
        trainer.strategy.barrier("reference-checkpoint")
