"""Supervised fine-tuning on response tokens: the shared core of warmup and final fine-tune."""

from __future__ import annotations

import lightning as L
import torch

from prism_lightning.config import LoraArgs, ModelArgs, OptimArgs, plain
from prism_lightning.data.tokenize import mean_logprob
from prism_lightning.modeling import build_model, trainable_named_parameters


def linear_schedule(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear rise over ``warmup_ratio * total`` steps, then linear decay to 0."""
    warm = int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return factor


class SFTModule(L.LightningModule):
    """LoRA / QLoRA / full SFT with loss ``l(z) = -lbar(completion | prompt)`` averaged over rows.

    The model is built in ``configure_model`` (so strategies can shard it) from ``model`` and
    ``lora``; ``adapter_path`` starts from a saved adapter instead of a fresh one.
    Lightning checkpoints hold only the trainable parameters (the base stays on disk).
    """

    def __init__(self, model: ModelArgs | None = None, lora: LoraArgs | None = None,
                 optim: OptimArgs | None = None, output_dir: str = "runs/tiny",
                 adapter_path: str | None = None):
        super().__init__()
        self.model_args, self.lora_args = model or ModelArgs(), lora or LoraArgs()
        self.optim_args, self.output_dir, self.adapter_path = optim or OptimArgs(), output_dir, adapter_path
        self.save_hyperparameters()
        self.model = None
        self.strict_loading = False

    def configure_model(self) -> None:
        if self.model is None:
            self.model = build_model(self.model_args, self.lora_args, adapter_path=self.adapter_path)

    def row_loss(self, batch: dict) -> torch.Tensor:
        """Per-row token-mean response loss ``-lbar`` [B]."""
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return -mean_logprob(logits, batch["labels"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.row_loss(batch).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=False)
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if "pairs" in batch:
            return self._pair_metrics(batch, "val")
        loss = self.row_loss(batch).mean()
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0],
                 add_dataloader_idx=False, sync_dist=True)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if "pairs" in batch:
            return self._pair_metrics(batch, "test")
        self.log("test/loss", self.row_loss(batch).mean(), batch_size=batch["input_ids"].shape[0],
                 add_dataloader_idx=False, sync_dist=True)

    def _pair_metrics(self, batch: dict, prefix: str) -> None:
        n = int(batch["pairs"])
        lbar = -self.row_loss(batch)
        margin = lbar[:n] - lbar[n:]
        self.log(f"{prefix}/pref_acc", (margin > 0).float().mean(), batch_size=n,
                 add_dataloader_idx=False, sync_dist=True)
        self.log(f"{prefix}/pref_margin", margin.mean(), batch_size=n, add_dataloader_idx=False, sync_dist=True)

    def configure_optimizers(self):
        params = list(trainable_named_parameters(self.model).values())
        o = self.optim_args
        opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(total, o.warmup_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {f"model.{n}" for n in trainable_named_parameters(self.model)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = plain(dict(checkpoint[key]))
