"""``FeatureStoreWriter``: a prediction writer that turns predict-step outputs into store shards."""

from __future__ import annotations

from collections import defaultdict

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from prism_lightning.store.feature_store import complete_shards, mark_complete, shard_rows, write_shard


class FeatureStoreWriter(BasePredictionWriter):
    """Buffers rows per (checkpoint, split, shard) and writes each shard once all its rows are in.

    Each rank writes only the shards it computed; at the end rank 0 marks every store whose
    shards are all present ``complete`` in its manifest (after a barrier). The end is the ``teardown`` hook:
    Lightning skips a rank's whole prediction loop (and its epoch-end hooks) when that rank has no batch (fewer
    shards to do than ranks), but calls ``teardown`` on every rank once prediction succeeded, so the ranks'
    barriers stay paired.
    """

    def __init__(self, stores: dict):
        """``stores``: (checkpoint tag, split) -> (store folder, manifest settings), filled by the feature module's
        ``setup`` before the first batch."""
        super().__init__(write_interval="batch")
        self.stores = stores
        self._buffers: dict = defaultdict(list)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        key = (prediction["tag"], prediction["split"])
        out, settings = self.stores[key]
        size, rows = settings["shard_size"], settings["rows"]
        first = int(prediction["index"][0])
        shard = first // size
        buf = self._buffers[(key, shard)]
        buf.append({k: v for k, v in prediction.items() if isinstance(v, torch.Tensor)})
        have = sum(p["index"].numel() for p in buf)
        if have == len(shard_rows(shard, size, rows)):
            merged = {k: torch.cat([p[k] for p in buf]) for k in buf[0]}
            order = torch.argsort(merged["index"])
            write_shard(out, shard, {k: v[order] for k, v in merged.items()})
            del self._buffers[(key, shard)]

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        if self._buffers:
            raise RuntimeError(f"prediction ended with partial shards {sorted(k[1] for k in self._buffers)}")
        trainer.strategy.barrier("feature-store")
        if trainer.is_global_zero:
            for out, settings in self.stores.values():
                total = -(-settings["rows"] // settings["shard_size"])
                if len(complete_shards(out, total)) == total:
                    mark_complete(out, settings, total)
        trainer.strategy.barrier("feature-store-complete")  # no rank reads a store before it is marked
