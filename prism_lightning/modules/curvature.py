"""``CurvatureModule``: K-FAC/EK-FAC factors of the LoRA layers at every warmup checkpoint.

Run with ``python -m prism_lightning curvature --config configs/tiny/curvature.yaml`` (the pipeline
runs it by itself when a ``kfac``/``ekfac`` preconditioner is chosen). Two prediction passes over the
warmup rows (``data.train_on: warmup``'s rows) per checkpoint: the token covariances of each layer's
inputs and output gradients, then, in their eigenbases, EK-FAC's per-example ``Lambda``
(``influence.curvature``). Sums are reduced over processes, so the factors do not depend on the
process count or the batch size; rank 0 writes ``epoch-N/curvature.safetensors`` (+ ``curvature.json``,
what they were fitted from) beside the checkpoint. Needs ``Trainer(inference_mode=False)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch

from prism_lightning import __version__
from prism_lightning.callbacks.signals import StopOnSigterm
from prism_lightning.config import LoraArgs, ModelArgs
from prism_lightning.context import StageContext, feature_overrides
from prism_lightning.errors import SettingsError, StageMismatchError
from prism_lightning.influence import curvature as C
from prism_lightning.influence.per_example import lora_linears
from prism_lightning.influence.preconditioners import needs_fit
from prism_lightning.modeling import build_model, load_adapter_weights
from prism_lightning.modules.features import check_base_model, find_checkpoints
from prism_lightning.provenance import differences
from prism_lightning.store.feature_store import PredictTask, num_shards


class CurvatureModule(L.LightningModule):
    """Fits the Kronecker factors of every LoRA layer at each warmup checkpoint (see module doc).

    Args:
        checkpoint_dir: the warmup folder holding ``epoch-N/`` checkpoints; factors are written into them.
        epochs: which checkpoints (default: all).
        force: refit checkpoints whose factors were fitted from other rows (otherwise refused).
    """

    def __init__(self, model: ModelArgs | None = None, checkpoint_dir: str = "runs/tiny/warmup",
                 epochs: list[int] | None = None, force: bool = False):
        super().__init__()
        self.model_args = model or ModelArgs()
        self.checkpoint_dir, self.epochs, self.force = checkpoint_dir, epochs, force
        self.output_dir = checkpoint_dir  # the folder this run writes to (the CLI's lock)
        self.save_hyperparameters()
        self.model = None
        self.phase: Literal["covariance", "lambda"] = "covariance"
        self.plan: list[PredictTask] = []
        self.eigen: dict[str, dict] = {}
        self.tokens: dict[str, float] = {}
        self.acc: dict = {}
        self._active: str | None = None

    def rows_record(self, dm) -> dict:
        """What the fitting rows are: the pool's digest, the warmup subset and the tokenization."""
        return {"pool_sha256": dm.source_digest("pool"), "pool_fingerprint": dm.fingerprint("pool"),
                "warmup_fraction": dm.warmup_fraction, "seed": dm.seed,
                "tokenization": dm.tokenization()}

    def setup(self, stage: str) -> None:
        if stage != "predict":
            return
        if torch.is_inference_mode_enabled():
            raise RuntimeError("curvature needs Trainer(inference_mode=False)")
        dm = self.trainer.datamodule
        dm.load()
        self.fit_rows = self.rows_record(dm)
        found = find_checkpoints(self.checkpoint_dir, self.epochs)
        check_base_model(self.model_args, found, str(self.trainer.precision))
        self.checkpoints = {f"epoch-{e}": (e, f, i) for e, f, i in found}
        if self.phase == "covariance":
            self.todo = []
            for tag, (_, folder, info) in self.checkpoints.items():
                record = C.factors_record(folder)
                if record is not None and C.fitted_for(folder, info["adapter_sha256"]):
                    if not differences(record.data, {"fit_rows": self.fit_rows}):
                        continue  # fitted from these rows already
                    if not self.force:
                        record.check({"fit_rows": self.fit_rows}, what=str(folder / C.FACTORS_FILE),
                                     error=StageMismatchError, fix="they were fitted from other warmup rows than "
                                     "data.pool, data.warmup_fraction and data.seed give now; rerun with "
                                     "--model.init_args.force true to refit them")
                self.todo.append(tag)
        rows = len(dm.split_dataset("warmup")[0])
        shards = list(range(num_shards(rows, dm.shard_size)))
        rank, world = self.trainer.global_rank, self.trainer.world_size
        self.plan = [PredictTask(tag, "warmup", shards[rank::world]) for tag in self.todo]
        dm.connect(predict_plan=self.plan)

    def configure_callbacks(self):
        return [StopOnSigterm()]

    def configure_model(self) -> None:
        if self.model is not None:
            return
        _, folder, _ = next(iter(self.checkpoints.values()))
        self.model = build_model(self.model_args, LoraArgs(), adapter_path=folder, trainable=True)
        self.model.eval()  # no dropout, and no activation checkpointing (its recomputation would count tokens twice)
        self.layers = lora_linears(self.model)

    def activate(self, tag: str) -> None:
        if self._active != tag:
            load_adapter_weights(self.model, self.checkpoints[tag][1], self.device)
            self._active = tag

    def accumulators(self) -> dict:
        """This phase's sums per planned checkpoint, zero until a batch adds to them."""
        if not self.acc:
            if self.phase == "covariance":
                self.acc = {tag: C.Covariances(self.layers) for tag in self.todo}
            else:
                self.acc = {tag: C.Lambdas(self.layers, self.eigen[tag]) for tag in self.todo}
        return self.acc

    def on_predict_start(self) -> None:
        self.trainer.predict_loop.return_predictions = False

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.plan[dataloader_idx]
        self.activate(task.tag)
        batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        with self.accumulators()[task.tag] as acc:
            acc.step(self.model, batch)

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.trainer.world_size == 1:
            return t
        return self.trainer.strategy.reduce(t.to(self.trainer.strategy.root_device), reduce_op="sum")

    def teardown(self, stage: str) -> None:
        """Sum every rank's part and write the factors. ``teardown`` rather than an epoch-end hook: Lightning skips
        the prediction loop, hooks included, of a rank without batches, but tears down every rank once prediction
        succeeded, so every rank joins the reductions (a rank without batches adds zeros)."""
        if stage != "predict" or not self.todo:
            return
        strategy = self.trainer.strategy
        for tag, acc in self.accumulators().items():
            if self.phase == "covariance":
                sums = {n: {k: self._reduce(v) for k, v in parts.items()} for n, parts in acc.sums.items()}
                tokens = float(self._reduce(acc.tokens))
                eigen = C.eigen_factors(sums, tokens) if self.trainer.is_global_zero else None
                self.eigen[tag] = strategy.broadcast(eigen, src=0)  # one eigenbasis for every rank
                self.tokens[tag] = tokens
            else:
                sums = {n: self._reduce(v) for n, v in acc.sums.items()}
                rows = float(self._reduce(acc.rows))
                if self.trainer.is_global_zero:
                    _, folder, info = self.checkpoints[tag]
                    C.save_factors(folder, C.with_lambdas(self.eigen[tag], sums, rows),
                                   {"adapter_sha256": info["adapter_sha256"], "rows": int(rows),
                                    "tokens": int(self.tokens[tag]), "fit_rows": self.fit_rows,
                                    "model": self.model_args.name_or_path, "package_version": __version__})
        self.acc = {}
        strategy.barrier("curvature-written")


def fit_curvature(trainer: L.Trainer, module: CurvatureModule, datamodule: L.LightningDataModule) -> list[Path]:
    """Both passes (covariances, then Lambda) for every checkpoint still to fit; returns the factor files."""
    module.phase = "covariance"
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    if module.todo:
        module.phase = "lambda"
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    return [folder / C.FACTORS_FILE for _, folder, _ in module.checkpoints.values()]


def command(trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule) -> list[str]:
    """Fit K-FAC/EK-FAC factors at every warmup checkpoint of ``model`` (a ``CurvatureModule``).

    Two passes over the warmup rows per checkpoint; writes ``epoch-N/curvature.safetensors``.
    """
    if not isinstance(model, CurvatureModule):
        raise SettingsError(f"curvature needs --model CurvatureModule, not {type(model).__name__}")
    files = [str(f) for f in fit_curvature(trainer, model, datamodule)]
    for f in files:
        print(f"factors: {f}")
    return files


# ----- as a pipeline stage ---------------------------------------------------------------------------------
def needed(ctx: StageContext) -> bool:
    """Only for the kfac/ekfac preconditioners."""
    return needs_fit(ctx.preconditioner)


def identity(ctx: StageContext) -> dict:
    """The factors are made of the warmup (its checkpoints) and the warmup rows."""
    return ctx.identities["warmup"]


def run(ctx: StageContext) -> None:
    trainer = ctx.trainer_for("curvature", **feature_overrides(ctx.trainer, ctx.args.features_precision))
    fit_curvature(trainer, CurvatureModule(model=ctx.model.model_args, checkpoint_dir=str(ctx.root / "warmup"),
                                           force=ctx.force), ctx.data_for())
