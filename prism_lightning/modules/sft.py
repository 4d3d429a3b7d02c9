"""Supervised fine-tuning on response tokens: the shared core of warmup and final fine-tune."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from torchmetrics import MeanMetric

from prism_lightning.config import FSDPArgs, LoraArgs, ModelArgs, OptimArgs, plain
from prism_lightning.eval import metrics as M
from prism_lightning.eval.generation import extract_answer, greedy_generate_ids, pair_choice
from prism_lightning.influence.objective import row_logprob
from prism_lightning.io import atomic_write_text
from prism_lightning.modeling import build_model, load_tokenizer, trainable_named_parameters
from prism_lightning.sharding import shard_from_rank0, shard_model


class SFTModule(L.LightningModule):
    """LoRA / QLoRA / full SFT with loss ``l(z) = -lbar(completion | prompt)`` averaged over rows.

    Validation/test (torchmetrics, per subtask and ``all``; names in ``eval.metrics``): response
    loss, preference accuracy ``mean[lbar(chosen) > lbar(rejected)]`` and mean margin on held-out
    pairs, and with ``generate_eval`` greedy exact match (``answer_pattern`` is a regex whose first
    group is the answer) and the behaviour on held-out pairs: the share of greedy answers that take
    the chosen (``wanted``) or the rejected (``unwanted``) way where the two answers first differ.
    Written to ``<output_dir>/<stage_dir>/metrics-{val,test}.json``.

    The model is built in ``configure_model`` from ``model`` and ``lora``; ``adapter_path`` starts
    from a saved adapter instead of a fresh one. Under ``ModelParallelStrategy`` (``FSDP2Strategy``)
    it is sharded there with ``fsdp`` settings (``prism_lightning.sharding``); activation
    checkpointing is ``model.gradient_checkpointing``. Lightning checkpoints hold only the
    trainable parameters and their optimizer state (the base stays on disk).

    Args:
        model: which causal LM to load and how.
        lora: LoRA adapter settings (``lora.enabled: false`` trains every parameter).
        optim: AdamW and its learning-rate schedule.
        output_dir: Where reference checkpoints, adapters and metrics are written (the run root).
        adapter_path: start from this saved adapter instead of a fresh one.
        generate_eval: greedy generation on held-out rows and pairs (exact match, wanted/unwanted).
        max_new_tokens: generation budget per held-out prompt.
        answer_pattern: regex whose first group is the answer compared by exact match (default: the text).
        fsdp: sharding settings used under the ``fsdp2`` strategy.
    """

    stage_dir = "sft"

    def __init__(self, model: ModelArgs | None = None, lora: LoraArgs | None = None,
                 optim: OptimArgs | None = None, output_dir: str = "runs/tiny",
                 adapter_path: str | None = None, generate_eval: bool = False, max_new_tokens: int = 16,
                 answer_pattern: str | None = None, fsdp: FSDPArgs | None = None):
        super().__init__()
        self.model_args, self.lora_args = model or ModelArgs(), lora or LoraArgs()
        self.optim_args, self.output_dir, self.adapter_path = optim or OptimArgs(), output_dir, adapter_path
        self.generate_eval, self.max_new_tokens, self.answer_pattern = generate_eval, max_new_tokens, answer_pattern
        self.fsdp_args = fsdp or FSDPArgs()
        self.save_hyperparameters()
        self.model = None
        self._tokenizer = None
        self.strict_loading = False

    def user_checkpointing(self) -> bool:
        """Whether the trainer was given a ``ModelCheckpoint`` by the user (it is then theirs to configure)."""
        given = getattr(self.trainer, "init_kwargs", {}).get("callbacks") or []
        return any(isinstance(c, ModelCheckpoint) for c in (given if isinstance(given, list) else [given]))

    def checkpoint_callbacks(self) -> list:
        """The Lightning checkpoints of this stage (for ``--ckpt_path last``) under ``<output_dir>/<stage_dir>/
        lightning/``, one per epoch and ``last.ckpt``; none when the user configured a ``ModelCheckpoint``."""
        if self.user_checkpointing():
            return []
        return [ModelCheckpoint(dirpath=str(Path(self.output_dir) / self.stage_dir / "lightning"), filename="{epoch}",
                                save_last=True, save_top_k=-1, every_n_epochs=1)]

    def last_checkpoint(self) -> Path | None:
        """This run's Lightning ``last.ckpt`` (``<output_dir>/<stage_dir>/lightning/``), if there is one."""
        path = Path(self.output_dir) / self.stage_dir / "lightning" / "last.ckpt"
        return path if path.exists() else None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        mesh = self._device_mesh

        def build(empty: bool = False):
            return build_model(self.model_args, self.lora_args, adapter_path=self.adapter_path, empty=empty)

        if mesh is not None and self.fsdp_args.load_on_rank0 and not self.model_args.quantization:
            self.model = shard_from_rank0(build, mesh, self.fsdp_args)
            return
        self.model = build()
        if mesh is not None:
            shard_model(self.model, mesh, self.fsdp_args)

    def row_loss(self, batch: dict) -> torch.Tensor:
        """Per-row token-mean response loss ``-lbar`` [B]."""
        return -row_logprob(self.model, batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.row_loss(batch).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    # ----- evaluation ----------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The model's tokenizer (decodes generations; the data module is connected to the same one)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_args)
        return self._tokenizer

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate", "test"):
            subs = self.trainer.datamodule.eval_subtasks()
            names = [M.metric_key(m, s) for s in subs + [M.ALL] for m in M.SFT_METRICS + M.PAIR_METRICS]
            self.eval_metrics = torch.nn.ModuleDict({n.replace("/", "__"): MeanMetric() for n in names})

    def _update(self, name: str, values: torch.Tensor, subtasks: list[str]) -> None:
        for sub in set(subtasks):
            mask = torch.tensor([s == sub for s in subtasks], device=values.device)
            self.eval_metrics[f"{name}__{sub}"].update(values[mask].float())
        self.eval_metrics[f"{name}__{M.ALL}"].update(values.float())

    def _eval_step(self, batch: dict) -> None:
        """Metrics of one evaluation batch, from what it carries (``subtask``, ``prompt_ids``, answer texts)."""
        subs = batch["subtask"]
        if "pairs" in batch:
            n = int(batch["pairs"])
            lbar = -self.row_loss(batch)
            margin = lbar[:n] - lbar[n:]
            self._update(M.PREF_ACC, (margin > 0).float(), subs)
            self._update(M.PREF_MARGIN, margin, subs)
            if self.generate_eval:
                gens = greedy_generate_ids(self.model, self.tokenizer, batch["prompt_ids"], self.max_new_tokens)
                picks = [pair_choice(g, c, r) for g, c, r in zip(gens, batch["chosen"], batch["rejected"])]
                for metric, side in ((M.WANTED, "chosen"), (M.UNWANTED, "rejected")):
                    self._update(metric, torch.tensor([float(k == side) for k in picks], device=self.device), subs)
            return
        self._update(M.LOSS, self.row_loss(batch), subs)
        if self.generate_eval:
            preds = greedy_generate_ids(self.model, self.tokenizer, batch["prompt_ids"], self.max_new_tokens)
            hits = [float(extract_answer(p, self.answer_pattern) == extract_answer(a, self.answer_pattern))
                    for p, a in zip(preds, batch["answer"])]
            self._update(M.EXACT_MATCH, torch.tensor(hits, device=self.device), subs)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def _eval_epoch_end(self, prefix: str) -> dict[str, float]:
        results = {}
        for key, metric in self.eval_metrics.items():
            if metric.update_called:
                name = key.replace("__", "/")
                results[name] = float(metric.compute())
                shown = name in (M.metric_key(M.LOSS), M.metric_key(M.EXACT_MATCH))
                self.log(f"{prefix}/{name}", results[name], prog_bar=shown)
            metric.reset()
        if self.trainer.is_global_zero and not self.trainer.sanity_checking and results:
            path = Path(self.output_dir) / self.stage_dir / f"metrics-{prefix}.json"
            atomic_write_text(path, json.dumps(results, indent=2, sort_keys=True))
        return results

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        """AdamW and ``transformers``' schedule (``optim.schedule``: rise over ``warmup_ratio`` of the steps, then
        linear decay, cosine decay or constant), stepped every optimizer step, as the Hugging Face ``Trainer``."""
        from transformers import get_scheduler

        params = list(trainable_named_parameters(self.model).values())
        o = self.optim_args
        opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = get_scheduler(o.schedule, opt, num_warmup_steps=math.ceil(o.warmup_ratio * total),
                              num_training_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_callbacks(self):
        """The learning rate logged every step (``LearningRateMonitor``) when the trainer has a logger."""
        return [LearningRateMonitor(logging_interval="step")] if self.trainer.loggers else []

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {f"model.{n}" for n in trainable_named_parameters(self.model)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = plain(dict(checkpoint[key]))
