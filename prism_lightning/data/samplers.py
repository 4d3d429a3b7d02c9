"""Samplers and batch iterables whose results do not depend on the number of processes.

Length-aware batching (real pools spread over one to two orders of magnitude in length, and a batch
padded to its longest row spends most of its compute on padding):

- feature extraction (``ShardBatches`` with ``max_tokens``): within each shard, rows sorted by length
  (longest first) and packed greedily up to a padded-token budget. Rows are scored independently and
  stored by row index, so the store does not depend on the batching;
- training (``GlobalBatchSampler`` with ``lengths``): the seeded epoch permutation is cut into groups of
  ``group_size`` global batches, each group sorted by length and cut into global batches, and the
  batches are shuffled (seeded), the one holding the longest row first so that memory fails fast.
  Every row is still visited once per epoch in a seeded order, every step has ``batch_size`` rows per
  rank, and the global batches do not depend on the process count. What changes: which rows share a
  step (rows of similar length), so the gradient of each step (not of the epoch) is not an unbiased
  sample of the pool's.
"""

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
    With ``lengths`` the global batches are length-grouped first (module docstring); the split over
    ranks is the same. Being a ``DistributedSampler``, Lightning keeps it (and calls ``set_epoch``) instead of
    injecting its own, which would reshuffle with another seed.
    """

    def __init__(self, n_rows: int, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0, lengths: list[int] | None = None, group_size: int = 64):
        super().__init__(range(n_rows), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.n_rows, self.batch_size = n_rows, batch_size
        if lengths is not None and len(lengths) != n_rows:
            raise ValueError(f"lengths has {len(lengths)} entries for {n_rows} rows")
        self.lengths, self.group_size = lengths, group_size

    def _global_batches(self, order: list[int]) -> list[list[int]]:
        """The epoch's global batches: consecutive slices of ``order``, or length-grouped (module docstring)."""
        size = self.batch_size * self.num_replicas
        if self.lengths is None:
            return [order[s:s + size] for s in range(0, len(order), size)]
        length, batches = self.lengths, []
        for s in range(0, len(order), size * self.group_size):
            group = sorted(order[s:s + size * self.group_size], key=lambda i: -length[i])  # stable
            batches += [group[j:j + size] for j in range(0, len(group), size)]
        short = [batches.pop()] if len(batches[-1]) < size else []  # a short batch stays last
        if self.shuffle and batches:
            gen = torch.Generator().manual_seed(self.seed + self.epoch + 7919)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
            first = max(range(len(batches)), key=lambda b: length[batches[b][0]])
            batches.insert(0, batches.pop(first))
        return batches + short

    def _chunks(self):
        order = (torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch))
                 if self.shuffle else torch.arange(self.n_rows)).tolist()
        world = self.num_replicas
        for chunk in self._global_batches(order):
            chunk = chunk + (order * world)[:-len(chunk) % world]  # pad to a multiple of the world size
            per = len(chunk) // world
            yield chunk[self.rank * per:(self.rank + 1) * per]

    def __iter__(self):
        for chunk in self._chunks():
            yield from chunk

    def __len__(self) -> int:
        """Rows per rank: ``batch_size`` per full global batch, ``ceil(rest / W)`` for a short last one."""
        full, rest = divmod(self.n_rows, self.batch_size * self.num_replicas)
        return full * self.batch_size + -(-rest // self.num_replicas)


def token_batches(rows: list[int], lengths: list[int], max_rows: int, max_tokens: int,
                  rows_per_item: int = 1) -> list[list[int]]:
    """``rows`` packed into batches by length: longest first, each batch at most ``max_rows`` items and
    ``max_tokens`` padded tokens (items x rows_per_item x its longest); an item over the budget goes alone.

    ``lengths[i]`` is the length of ``rows[i]``.
    """
    order = sorted(range(len(rows)), key=lambda i: -lengths[i])  # stable: equal lengths keep row order
    batches: list[list[int]] = []
    for i in order:  # descending, so a batch's first item is its longest
        last = batches[-1] if batches else None
        if (last is not None and len(last) < max_rows
                and (len(last) + 1) * rows_per_item * lengths[last[0]] <= max_tokens):
            last.append(i)
        else:
            batches.append([i])
    return [[rows[i] for i in b] for b in batches]


class ShardBatches(IterableDataset):
    """Collated batches of the given shards' rows, never crossing a shard.

    Used for prediction so that each rank computes a disjoint set of whole shards with no
    padding rows (unlike ``DistributedSampler``) and results do not depend on the process count.
    Batches are ``batch_size`` rows in row order, or, with ``max_tokens``, the shard's rows packed by
    length (``token_batches``); the store writer puts rows back in row order either way.
    """

    def __init__(self, dataset, collate, shards: list[int], shard_size: int, batch_size: int,
                 max_tokens: int | None = None):
        self.dataset, self.collate, self.shards = dataset, collate, shards
        self.shard_size, self.batch_size, self.max_tokens = shard_size, batch_size, max_tokens
        self._length: int | None = None

    def _batches(self):
        for s in self.shards:
            rows = shard_rows(s, self.shard_size, len(self.dataset))
            if self.max_tokens:
                yield from token_batches(list(rows), self.dataset.lengths(rows), self.batch_size,
                                         self.max_tokens, self.dataset.rows_per_item)
                continue
            for start in range(rows.start, rows.stop, self.batch_size):
                yield list(range(start, min(start + self.batch_size, rows.stop)))

    def __len__(self) -> int:
        """The number of batches (so a progress bar shows its total); ranks may hold different numbers, which
        prediction allows (every rank runs the same loaders, each to its own length)."""
        if self._length is None:
            self._length = sum(1 for _ in self._batches())
        return self._length

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for b, idx in enumerate(self._batches()):
            if info is None or b % info.num_workers == info.id:
                yield self.collate([self.dataset[i] for i in idx])
