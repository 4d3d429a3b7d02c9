"""``PrismReselection``: re-select a fine-tune's rows between epochs, with preference weights at the current model.

The static selection weighs each target pair by ``pi_q = sigmoid(lbar(y+|q) - lbar(y-|q))`` at the warmup
checkpoints. As the fine-tune learns, the pairs it already satisfies change; this callback recomputes pi on
the target pairs with the model being trained, every ``every`` epochs, re-scores the pool with it (the stored
features and target gradients at the warmup checkpoints are unchanged; only the weights move) and trains on
the new budget's rows from the next epoch on. Every rank computes the same pi (all target pairs), scores its
block of the pool shards (``select.compute_scores``), and rank 0's rows are broadcast.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from prism_lightning.config import SelectionArgs
from prism_lightning.errors import SettingsError
from prism_lightning.influence.scoring import GRADIENT_MODES, preference_weights
from prism_lightning.influence.selection import choose
from prism_lightning.io import atomic_write_text
from prism_lightning.ranks import Ranks


def target_log_likelihoods(pl_module: L.LightningModule, datamodule) -> tuple[torch.Tensor, torch.Tensor]:
    """``lbar(y+|q)``, ``lbar(y-|q)`` [m] of every target pair at the current model (eval mode, no gradients)."""
    dataset, collate = datamodule.split_dataset("target")
    chosen, rejected = torch.empty(len(dataset), dtype=torch.float64), torch.empty(len(dataset), dtype=torch.float64)
    was_training = pl_module.training
    pl_module.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), datamodule.eval_batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + datamodule.eval_batch_size, len(dataset)))])
            batch = {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            lbar = -pl_module.row_loss(batch).double().cpu()
            n = int(batch["pairs"])
            idx = batch["index"].cpu()
            chosen[idx], rejected[idx] = lbar[:n], lbar[n:]
    pl_module.train(was_training)
    return chosen, rejected


class PrismReselection(L.Callback):
    """Every ``every`` epochs of a fine-tune whose data module computes its rows (``data.selection``, a gradient
    mode): pi at the current model, the pool re-scored, the budget re-chosen, ``set_train_rows`` on every rank.

    Sets ``trainer.reload_dataloaders_every_n_epochs`` to ``every`` (it must be 0, 1 or ``every``), so the next
    epoch's loader holds the new rows. Each re-selection is a line of ``<trainer.default_root_dir>/
    reselection.jsonl`` (epoch, rows, rows added and removed, pi per target pair and its mean) and the logged
    ``reselect/changed``.
    """

    def __init__(self, every: int = 1):
        if every < 1:
            raise SettingsError(f"PrismReselection: every={every} must be >= 1")
        self.every = every
        self.history: list[dict] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        sel = getattr(trainer.datamodule, "selection", None)
        if sel is None or sel.mode not in GRADIENT_MODES:
            raise SettingsError("PrismReselection needs a data module that computes its rows with data.selection "
                                f"and a gradient mode ({', '.join(GRADIENT_MODES)})")
        if trainer.reload_dataloaders_every_n_epochs not in (0, 1, self.every):
            raise SettingsError(f"PrismReselection(every={self.every}) needs trainer.reload_dataloaders_every_n_epochs "
                                f"0, 1 or {self.every}, not {trainer.reload_dataloaders_every_n_epochs}")
        if trainer.reload_dataloaders_every_n_epochs == 0:
            trainer.reload_dataloaders_every_n_epochs = self.every

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every or epoch >= trainer.max_epochs:
            return
        from prism_lightning.select import compute_scores, target_view

        dm = trainer.datamodule
        sel = dm.selection
        args = SelectionArgs(**{k: getattr(sel, k) for k in SelectionArgs.__dataclass_fields__})
        chosen, rejected = target_log_likelihoods(pl_module, dm)
        pi = preference_weights(chosen, rejected)[torch.tensor(target_view(dm.target_rows, args.subtask))]
        ranks = Ranks.of(trainer.strategy)
        scores, _ = compute_scores(sel.features, [sel.mode], args, len(dm.pool_rows), dm.target_rows, ranks, pi=pi)
        keep = choose(scores[sel.mode], args.task, args.fraction, args.k)
        rows = ranks.broadcast(keep.nonzero().flatten().tolist() if ranks.is_zero else None)
        before = set(dm.train_indices())
        dm.set_train_rows(rows)
        record = {"epoch": epoch, "rows": len(rows), "added": len(set(rows) - before),
                  "removed": len(before - set(rows)), "pi_mean": float(pi.mean()), "pi": pi.tolist()}
        self.history.append(record)
        pl_module.log("reselect/changed", float(record["added"]), rank_zero_only=True)
        if trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / "reselection.jsonl"
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.history))
