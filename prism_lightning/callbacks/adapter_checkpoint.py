"""Per-epoch reference checkpoints: adapter, Adam moments and the epoch's mean learning rate.

Layout of ``<output_dir>/<subdir>/epoch-N/`` (N = 1, 2, ...):

- ``adapter_config.json``, ``adapter_model.safetensors``: the peft adapter (``save_pretrained``);
  for a full fine-tune, ``model.safetensors`` with the trainable weights instead.
- ``optimizer.safetensors``: ``<param name>.exp_avg`` and ``<param name>.exp_avg_sq`` (AdamW's m and
  v) for every trainable parameter, names as in ``model.named_parameters()``.
- ``checkpoint.json``: epoch, ``lr_mean`` (mean LR over the epoch's steps), steps, model id,
  LoRA settings, Adam betas/eps, and the adapter's sha256 (written last: its presence marks a
  complete checkpoint). The folder is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from prism_lightning import __version__
from prism_lightning.io import atomic_folder, file_sha256
from prism_lightning.modeling import trainable_named_parameters
from prism_lightning.sharding import full_tensor, gather_trainable


def adam_moments(optimizer: torch.optim.Optimizer, names: dict) -> dict[str, torch.Tensor]:
    """``{name.exp_avg, name.exp_avg_sq}`` for each parameter the optimizer holds state for.

    Under FSDP the moments are sharded ``DTensor``s: this gathers them, so every rank must call it.
    """
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg" in state and p in names:
                for key in ("exp_avg", "exp_avg_sq"):
                    out[f"{names[p]}.{key}"] = full_tensor(state[key].detach()).float().cpu().contiguous()
    return out


def save_trainable(model, weights: dict[str, torch.Tensor], folder: Path) -> Path:
    """Write gathered trainable weights: a peft adapter (``save_pretrained``) or ``model.safetensors``."""
    if hasattr(model, "save_pretrained") and hasattr(model, "peft_config"):
        model.save_pretrained(str(folder), state_dict=weights)
        return folder / "adapter_model.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
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
    return write_reference_checkpoint(folder, lambda tmp: save_trainable(model, weights, tmp), moments, info)


def write_reference_checkpoint(folder: Path, write_weights, moments: dict[str, torch.Tensor], info: dict) -> Path:
    """The one writer of ``epoch-N/``: ``write_weights(tmp) -> weights file``, Adam moments keyed by parameter
    name (``<name>.exp_avg``/``.exp_avg_sq``), and ``checkpoint.json`` (``info`` plus the weights' sha256),
    atomically."""
    with atomic_folder(folder) as tmp:
        path = write_weights(tmp)
        if moments:
            save_file({k: v.contiguous() for k, v in moments.items()}, str(tmp / "optimizer.safetensors"))
        info = dict(info, adapter_sha256=file_sha256(path), package_version=__version__)
        (tmp / "checkpoint.json").write_text(json.dumps(info, indent=2))
    return Path(folder)


class ReferenceCheckpoint(L.Callback):
    """Saves ``<output_dir>/<subdir>/epoch-N/`` at the end of every training epoch (rank 0)."""

    def __init__(self, subdir: str = "warmup"):
        self.subdir = subdir
        self._lr_sum = 0.0
        self._lr_steps = 0

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
                "betas": list(opt.param_groups[0]["betas"]), "eps": opt.param_groups[0]["eps"]}
        folder = Path(pl_module.output_dir) / self.subdir / f"epoch-{epoch}"
        save_reference_checkpoint(pl_module, opt, folder, info, write=trainer.is_global_zero)
        trainer.strategy.barrier("reference-checkpoint")
