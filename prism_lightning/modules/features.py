"""``GradientFeatureModule``: per-example projected LoRA gradients for every warmup checkpoint.

One ``predict`` call runs a pass per (checkpoint, split) and writes ``features/epoch-N/{pool,target}``
(see ``prism_lightning.store.feature_store``). For each row it computes the exact gradient of its
token-mean response loss w.r.t. the LoRA weights (``influence.per_example``), preconditions it
(``adam`` with the checkpoint's moments for the pool, ``sgd`` = plain gradient for targets, or
``identity``), projects it (``influence.projection``) and L2-normalises it (``normalize``).
Needs ``Trainer(inference_mode=False)``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from safetensors.torch import load_file

from prism_lightning import __version__
from prism_lightning.callbacks.adapter_checkpoint import RUN_FILE, check_checkpoint
from prism_lightning.callbacks.signals import StopOnSigterm
from prism_lightning.config import LoraArgs, ModelArgs, ProjectionArgs, TargetCheckpoint
from prism_lightning.context import StageContext, feature_overrides
from prism_lightning.errors import SettingsError, StoreMismatchError
from prism_lightning.influence import curvature
from prism_lightning.influence.extract import gradient_features
from prism_lightning.influence.per_example import lora_linears
from prism_lightning.influence.preconditioners import (
    Preconditioner,
    PreconditionerName,
    make_preconditioner,
    needs_fit,
)
from prism_lightning.influence.projection import Projector, projection_identity
from prism_lightning.modeling import base_model_identity, build_model, load_adapter_weights, torch_dtype
from prism_lightning.provenance import Manifest
from prism_lightning.store.feature_store import (
    FORMAT_VERSION,
    FeatureStore,
    PredictTask,
    check_settings,
    complete_shards,
    num_shards,
    orphan_shards,
)
from prism_lightning.store.writer import FeatureStoreWriter


def find_checkpoints(checkpoint_dir: str | Path, epochs: list[int] | None = None) -> list[tuple[int, Path, dict]]:
    """Complete ``epoch-N`` folders (those with ``checkpoint.json``) as (N, folder, info), by N; checkpoints of
    different warmup runs are refused."""
    root = Path(checkpoint_dir)
    found = []
    for folder in root.glob("epoch-*"):
        meta = Manifest.read(folder / "checkpoint.json") if folder.is_dir() else None
        if meta is not None and (epochs is None or meta["epoch"] in epochs):
            found.append((int(meta["epoch"]), folder, meta.data))
    if not found:
        raise FileNotFoundError(f"{root}: no complete warmup checkpoint (epoch-N/checkpoint.json); run the "
                                "warmup stage first or fix checkpoint_dir")
    found.sort(key=lambda t: t[0])
    run = Manifest.read(root / RUN_FILE)
    runs = {f"epoch-{e}": info.get("run_id") for e, _, info in found}
    if len(set(runs.values())) > 1 or (run is not None and set(runs.values()) != {run.get("run_id")}):
        raise StoreMismatchError(f"{root}: its checkpoints come from different warmup runs ("
                                 f"{', '.join(f'{k}: {v}' for k, v in runs.items())}"
                                 f"{f'; {RUN_FILE}: ' + str(run.get('run_id')) if run is not None else ''}); rerun "
                                 "the warmup into a fresh folder (or with force: true, which replaces the old run)")
    return found


def check_base_model(model: ModelArgs, checkpoints, precision: str | None) -> dict:
    """The base model's identity (``modeling.base_model_identity``), after checking that it is the one every
    warmup checkpoint was trained from and that their files are the ones they record."""
    base = base_model_identity(model, precision)
    for _, folder, info in checkpoints:
        check_checkpoint(folder, info)
        if info.get("base_model") is not None:
            Manifest(folder / "checkpoint.json", info).check(
                {"base_model": {"name_or_path": base["name_or_path"], "sha256": base["sha256"]}},
                what=str(folder), error=StoreMismatchError,
                fix="the warmup was trained from another base model: give that model's model.name_or_path, or run "
                    "the warmup with this one")
    return base


class GradientFeatureModule(L.LightningModule):
    """Writes gradient features of the pool and the target pairs at each warmup checkpoint.

    Args:
        checkpoint_dir: the warmup folder holding ``epoch-N/`` checkpoints.
        output_dir: run root; stores go to ``<output_dir>/features/epoch-N/<split>/``.
        epochs: which checkpoints (default: all).
        pool_preconditioner / target_preconditioner: a registered preconditioner
            (``influence.preconditioners``): ``adam``, Adam's next update ``m' / (sqrt(v') + eps)``
            (LESS); ``adam_no_momentum``, ``g / (sqrt(v') + eps)`` (default for the pool, see
            docs/evidence.md); ``sgd`` and ``identity`` both keep the plain gradient (``sgd`` names
            LESS's target features, ``identity`` the raw-gradient, TracIn-like setting); ``kfac`` and
            ``ekfac``, the inverse of the Kronecker-factored curvature fitted on the warmup rows by the
            ``curvature`` stage (influence functions with K-FAC / EK-FAC, as kronfluence).
        damping: damping of ``kfac``/``ekfac``, relative to the mean eigenvalue of each layer.
        normalize: L2-normalise each feature (LESS's cosine similarity).
        store_dtype: dtype of the stored features (``float32`` or ``float16``/``bfloat16`` for disk).
        splits: which stores to write (default both).
        verify: before reusing a complete store, recompute every shard's sha256 against its manifest.
        target_checkpoint: ``each`` writes the target store at every checkpoint; ``last`` only at the last one
            (for ``selection.target_checkpoint: last``, which scores every checkpoint's pool against it).
    """

    def __init__(self, model: ModelArgs | None = None, checkpoint_dir: str = "runs/tiny/warmup",
                 output_dir: str = "runs/tiny", epochs: list[int] | None = None,
                 projection: ProjectionArgs | None = None,
                 pool_preconditioner: PreconditionerName = "adam_no_momentum",
                 target_preconditioner: PreconditionerName = "sgd", damping: float = 0.1, normalize: bool = True,
                 store_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 splits: list[Literal["pool", "target"]] | None = None, verify: bool = False,
                 target_checkpoint: TargetCheckpoint = "each"):
        super().__init__()
        self.model_args, self.projection = model or ModelArgs(), projection or ProjectionArgs()
        self.checkpoint_dir, self.output_dir, self.epochs = checkpoint_dir, output_dir, epochs
        self.preconditioner = {"pool": pool_preconditioner, "target": target_preconditioner}
        if not damping > 0:
            raise SettingsError(f"damping={damping} must be > 0 (it keeps the curvature invertible)")
        self.damping = damping
        self.normalize, self.store_dtype = normalize, store_dtype
        self.splits = splits or ["pool", "target"]
        self.target_checkpoint = target_checkpoint
        self.verify = verify
        self.save_hyperparameters()
        self.model = None
        self.plan: list[PredictTask] = []
        self.stores: dict[tuple[str, str], tuple[Path, dict]] = {}  # (checkpoint, split) -> (folder, manifest)
        self._active: str | None = None

    # ----- planning ------------------------------------------------------------------------
    def store_dir(self, epoch: int, split: str) -> Path:
        return Path(self.output_dir) / "features" / f"epoch-{epoch}" / split

    def store_settings(self, epoch: int, folder: Path, info: dict, split: str, dm, dim: int) -> dict:
        """The manifest of one store: everything that determines its contents.

        ``dataset_fingerprint`` hashes the token ids (what the features depend on); ``source_sha256``
        hashes the parsed rows and ``tokenization`` the length policy, which ``select`` checks against
        the data it is given without tokenizing it again.
        """
        proj = projection_identity(self.projection)
        dataset, _ = dm.split_dataset(split)
        return {"format": FORMAT_VERSION, "split": split, "model": self.model_args.name_or_path,
                "base_model": self.base_model,
                "adapter_path": str(folder), "adapter_sha256": info["adapter_sha256"], "epoch": epoch,
                "lr_mean": info["lr_mean"], "dataset_fingerprint": dm.fingerprint(split),
                "source_sha256": dm.source_digest(split), "source": dm.source_record(split),
                "columns": asdict(dm.columns_of(split)), "tokenization": dm.tokenization(),
                "projection": proj,
                "preconditioner": self.preconditioner[split], **self.curvature_settings(folder, info, split),
                "normalize": self.normalize,
                "dtype": self.store_dtype, "shard_size": dm.shard_size, "rows": len(dataset), "dim": dim,
                "package_version": __version__, "complete": False}

    def curvature_settings(self, folder: Path, info: dict, split: str) -> dict:
        """For kfac/ekfac: the damping and the sha256 of the factors, computed from the file (a refit, or other
        bytes, make another store)."""
        if not needs_fit(self.preconditioner[split]):
            return {}
        return {"damping": self.damping,
                "curvature_sha256": curvature.check_factors(folder, info["adapter_sha256"])["sha256"]}

    def setup(self, stage: str) -> None:
        if stage != "predict":
            return
        if torch.is_inference_mode_enabled():
            raise RuntimeError("gradient features need Trainer(inference_mode=False)")
        dm = self.trainer.datamodule
        dm.load()
        self.checkpoints = {f"epoch-{e}": (e, f, i) for e, f, i in find_checkpoints(self.checkpoint_dir, self.epochs)}
        self.base_model = check_base_model(self.model_args, self.checkpoints.values(), str(self.trainer.precision))
        sizes = self._layer_sizes()
        rank, world = self.trainer.global_rank, self.trainer.world_size
        self.plan, self._incomplete = [], set()
        self.stores.clear()
        last = max(e for e, _, _ in self.checkpoints.values())
        for tag, (epoch, folder, info) in self.checkpoints.items():
            for split in self.splits:
                if split == "target" and self.target_checkpoint == "last" and epoch != last:
                    continue
                dataset, _ = dm.split_dataset(split)
                out = self.store_dir(epoch, split)
                settings = self.store_settings(epoch, folder, info, split, dm, Projector(self.projection, sizes).dim)
                orphans = orphan_shards(out)
                if orphans:
                    raise StoreMismatchError(
                        f"{out} holds {len(orphans)} shard files but no manifest.json: nothing proves they were "
                        "made with these settings, so they are not reused; delete them and rerun predict")
                check_settings(out, settings)
                self.stores[(tag, split)] = (out, settings)
                total = num_shards(len(dataset), dm.shard_size)
                todo = sorted(set(range(total)) - complete_shards(out, total))
                if self.verify and not todo:
                    FeatureStore(out, verify=True)
                if todo:  # same tasks on every rank (some may get no shard), so ranks stay in step
                    self.plan.append(PredictTask(tag, split, todo[rank::world]))
                    self._incomplete.add((tag, split))
        self.trainer.strategy.barrier("feature-plan")
        if self.trainer.is_global_zero:
            for key, (out, settings) in self.stores.items():
                # a store being (re)computed is marked incomplete until the writer lists all its shards
                if key in self._incomplete or not (out / "manifest.json").exists():
                    Manifest(out / "manifest.json", settings).write()
        dm.connect(predict_plan=self.plan)

    def _layer_sizes(self) -> dict[str, int]:
        """LoRA layer sizes read from the first checkpoint's adapter file (no model needed)."""
        _, folder, _ = next(iter(self.checkpoints.values()))
        path = folder / "adapter_model.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{folder}: no adapter_model.safetensors; gradient features need a LoRA "
                                    "warmup (lora.enabled: true)")
        weights = load_file(str(path))
        return {k: v.numel() for k, v in weights.items()}

    def configure_callbacks(self):
        return [FeatureStoreWriter(self.stores), StopOnSigterm()]

    def on_predict_start(self) -> None:
        # every row's features go to the store as its shard completes: never also keep them in memory, whatever
        # `trainer.predict(return_predictions=...)` asked (memory stays bounded by the batch, not the pool)
        self.trainer.predict_loop.return_predictions = False

    # ----- model ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        _, folder, _ = next(iter(self.checkpoints.values()))
        self.model = build_model(self.model_args, LoraArgs(), adapter_path=folder, trainable=True)
        self.model.eval()
        if self.model_args.gradient_checkpointing:  # HF checkpoints only in train mode: zero dropout instead
            self.model.train()
            for m in self.model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
        self.layers = lora_linears(self.model)

    def activate(self, tag: str) -> None:
        """Load checkpoint ``tag``'s adapter weights and each split's preconditioner state (once per pass)."""
        if self._active == tag:
            return
        _, folder, info = self.checkpoints[tag]
        load_adapter_weights(self.model, folder, self.device)
        self.preconditioners: dict[str, Preconditioner] = {}
        for split, name in self.preconditioner.items():
            self.preconditioners[split] = make_preconditioner(name, self.device, self.damping)
            self.preconditioners[split].load(folder, info)
        self.projector = Projector(self.projection, {n: m.weight.numel() for n, m in self.layers.items()})
        self._active = tag

    # ----- features ------------------------------------------------------------------------
    def gradient_features(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, k] in ``store_dtype`` on CPU, lbar [B]) of a batch of ``split``."""
        feats, lbar = gradient_features(self.model, self.layers, batch, self.projector, self.preconditioners[split],
                                        self.normalize)
        return feats.to(torch_dtype(self.store_dtype)).cpu(), lbar.cpu()

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        task = self.plan[dataloader_idx]
        self.activate(task.tag)
        feats, lbar = self.gradient_features(batch, task.split)
        result = {"tag": task.tag, "split": task.split, "index": batch["index"].cpu()}
        if task.split == "pool":
            result.update(features=feats, loss=-lbar)
        else:
            n = int(batch["pairs"])
            result.update(chosen=feats[:n], rejected=feats[n:], lbar_chosen=lbar[:n], lbar_rejected=lbar[n:])
        return result


# ----- as a pipeline stage ---------------------------------------------------------------------------------
def identity(ctx: StageContext) -> dict:
    """The features are made of the warmup, the projection, the preconditioner (and its damping)."""
    out = dict(ctx.identities["warmup"], projection=asdict(ctx.args.projection), pre=ctx.preconditioner)
    if needs_fit(ctx.preconditioner):
        out["damping"] = ctx.args.damping
    if ctx.args.target_checkpoint != "each":
        out["target_checkpoint"] = ctx.args.target_checkpoint
    return out


def run(ctx: StageContext) -> None:
    module = GradientFeatureModule(model=ctx.model.model_args, checkpoint_dir=str(ctx.root / "warmup"),
                                   output_dir=str(ctx.root), projection=ctx.args.projection,
                                   pool_preconditioner=ctx.preconditioner, damping=ctx.args.damping,
                                   target_checkpoint=ctx.args.target_checkpoint)
    trainer = ctx.trainer_for("features", **feature_overrides(ctx.trainer, ctx.args.features_precision))
    trainer.predict(module, datamodule=ctx.data_for(), return_predictions=False)
