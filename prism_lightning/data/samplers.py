"""Samplers and batch iterables whose results do not depend on the number of processes."""

from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler, IterableDataset

from prism_lightning.store.feature_store import shard_rows


class GlobalBatchSampler(DistributedSampler):
    """Training order that does not depend on the process count: each global batch split over ranks.

    Epoch e visits the rows in a permutation seeded by ``seed + e`` (pool order without
    ``shuffle``). Global batch j is rows ``[j G, (j + 1) G)`` of it, ``G = batch_size x replicas``,
    and rank r takes its r-th slice of ``batch_size`` rows; so W processes with batch B train on
    exactly the batches one process with batch W B sees. A short last global batch is padded to a
    multiple of W with rows from the start of the epoch's order (as ``DistributedSampler`` pads).
    Being a ``DistributedSampler``, Lightning keeps it (and calls ``set_epoch``) instead of
    injecting its own, which would reshuffle with another seed.
    """

    def __init__(self, n_rows: int, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0):
        super().__init__(range(n_rows), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.n_rows, self.batch_size = n_rows, batch_size

    def _chunks(self):
        order = (torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch))
                 if self.shuffle else torch.arange(self.n_rows)).tolist()
        world = self.num_replicas
        for start in range(0, self.n_rows, self.batch_size * world):
            chunk = order[start:start + self.batch_size * world]
            chunk += (order * world)[:-len(chunk) % world]  # pad to a multiple of the world size
            per = len(chunk) // world
            yield chunk[self.rank * per:(self.rank + 1) * per]

    def __iter__(self):
        for chunk in self._chunks():
            yield from chunk

    def __len__(self) -> int:
        """Rows per rank: ``batch_size`` per full global batch, ``ceil(rest / W)`` for a short last one."""
        full, rest = divmod(self.n_rows, self.batch_size * self.num_replicas)
        return full * self.batch_size + -(-rest // self.num_replicas)


class ShardBatches(IterableDataset):
    """Collated batches of the given shards' rows, in row order, never crossing a shard.

    Used for prediction so that each rank computes a disjoint set of whole shards with no
    padding rows (unlike ``DistributedSampler``) and results do not depend on the process count.
    """

    def __init__(self, dataset, collate, shards: list[int], shard_size: int, batch_size: int):
        self.dataset, self.collate, self.shards = dataset, collate, shards
        self.shard_size, self.batch_size = shard_size, batch_size

    def _batches(self):
        for s in self.shards:
            rows = shard_rows(s, self.shard_size, len(self.dataset))
            for start in range(rows.start, rows.stop, self.batch_size):
                yield list(range(start, min(start + self.batch_size, rows.stop)))

    # No __len__ on purpose: Lightning would all-reduce every loader's length across ranks, and
    # ranks may hold different numbers of batches.

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for b, idx in enumerate(self._batches()):
            if info is None or b % info.num_workers == info.id:
                yield self.collate([self.dataset[i] for i in idx])
