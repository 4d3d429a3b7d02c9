"""``PrismDataModule``: one data module for warmup, gradient features and the final fine-tune."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from prism_lightning import DEMO_DATA
from prism_lightning.data.datasets import PairCollator, PairDataset, SFTCollator, SFTDataset
from prism_lightning.data.formats import Columns, DataFormatError, PairRow, SFTRow, load_pairs, load_sft
from prism_lightning.data.tokenize import Encoder
from prism_lightning.select import SelectionArgs


@dataclass
class PredictTask:
    """One pass of the predict loop: ``split`` (``pool``/``target``) rows of the shards to compute."""

    tag: str
    split: str
    shards: list[int] = field(default_factory=list)


def shard_rows(shard: int, shard_size: int, n_rows: int) -> range:
    """Row indices of shard ``shard``: ``[shard * size, min((shard + 1) * size, n))``."""
    return range(shard * shard_size, min((shard + 1) * shard_size, n_rows))


def num_shards(n_rows: int, shard_size: int) -> int:
    return (n_rows + shard_size - 1) // shard_size


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


class PrismDataModule(L.LightningDataModule):
    """Pool, target pairs and evaluation sets for every stage.

    Args:
        pool: candidate SFT rows (``id``, ``prompt``, ``completion``, ``subtask``; or messages/text).
        target: target preference pairs (``prompt``, ``chosen``, ``rejected``, ``subtask``).
        eval_sft: held-out SFT rows for validation/test (exact match, loss).
        eval_pairs: held-out preference pairs for validation/test (preference accuracy).
        tokenizer: tokenizer path or hub id (linked to ``model.model.name_or_path`` by the CLI).
        train_on: ``warmup`` (seeded ``warmup_fraction`` of the pool), ``pool`` (all of it)
            or ``selection`` (the rows a selection keeps; see the ``select`` stage).
        max_length / truncation: token budget per row; ``left`` cuts the prompt, ``error`` refuses.
        batch_size: training rows per step and rank (global batch = batch_size x devices x
            num_nodes x accumulate_grad_batches).
        shuffle: reshuffle the training rows each epoch (seeded; ``false`` keeps pool order).
        shard_size: rows per feature-store shard (prediction splits work by whole shards).
        selection_file: rows to train on with ``train_on: selection`` (a ``selected.jsonl``); or
        selection_dir / selection_mode: use ``<selection_dir>/<mode>/selected.jsonl``, computed on
            rank 0 from ``features_dir`` with ``selection`` settings when missing.
    """

    def __init__(self, pool: str = f"{DEMO_DATA}/pool.jsonl",
                 target: str | None = f"{DEMO_DATA}/target_pairs.jsonl",
                 eval_sft: str | None = f"{DEMO_DATA}/eval.jsonl",
                 eval_pairs: str | None = f"{DEMO_DATA}/eval_pairs.jsonl",
                 tokenizer: str | None = None, columns: Columns | None = None,
                 train_on: str = "warmup", warmup_fraction: float = 0.05, seed: int = 0,
                 max_length: int = 256, truncation: str = "left", batch_size: int = 8,
                 eval_batch_size: int = 16, num_workers: int = 0, shard_size: int = 256,
                 selection_file: str | None = None, selection_dir: str | None = None,
                 selection_mode: str = "prism", features_dir: str | None = None,
                 selection: SelectionArgs | None = None, shuffle: bool = True):
        super().__init__()
        if train_on not in ("warmup", "pool", "selection"):
            raise ValueError(f"data.train_on={train_on!r} must be 'warmup', 'pool' or 'selection'")
        if not 0 < warmup_fraction <= 1:
            raise ValueError(f"data.warmup_fraction={warmup_fraction} must be in (0, 1]")
        self.save_hyperparameters()
        self.cols = Columns(**columns) if isinstance(columns, dict) else (columns or Columns())
        self.selection_args = SelectionArgs(**selection) if isinstance(selection, dict) else selection
        self.predict_plan: list[PredictTask] | None = None
        self._tokenizer = None
        self._ready = False

    # ----- loading -------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from prism_lightning.config import ModelArgs
            from prism_lightning.modeling import load_tokenizer

            name = self.hparams.tokenizer
            module = self.trainer.lightning_module if self.trainer is not None else None
            if name is None and getattr(module, "model_args", None) is not None:
                name = module.model_args.name_or_path  # the model being trained or scored
            name = name or ModelArgs().name_or_path
            self._tokenizer = load_tokenizer(ModelArgs(name_or_path=name))
        return self._tokenizer

    def _encode_sft(self, rows: list[SFTRow], path: str):
        enc = Encoder(self.tokenizer, self.hparams.max_length, self.hparams.truncation)
        out = [enc.encode(r.prompt, r.completion, f"{path}: row {i + 1} (id {r.id})") for i, r in enumerate(rows)]
        enc.warn_truncated(path)
        return out

    def _encode_pairs(self, rows: list[PairRow], path: str):
        enc = Encoder(self.tokenizer, self.hparams.max_length, self.hparams.truncation)
        where = [f"{path}: row {i + 1} (id {r.id})" for i, r in enumerate(rows)]
        chosen = [enc.encode(r.prompt, r.chosen, w) for r, w in zip(rows, where)]
        rejected = [enc.encode(r.prompt, r.rejected, w) for r, w in zip(rows, where)]
        enc.warn_truncated(path)
        return chosen, rejected

    def load(self) -> None:
        """Read, validate and tokenize every configured file (once; before any compute)."""
        if self._ready:
            return
        hp = self.hparams
        self.pool_rows = load_sft(hp.pool, self.cols)
        self.pool_encoded = self._encode_sft(self.pool_rows, hp.pool)
        self.target_rows = load_pairs(hp.target, self.cols) if hp.target else []
        self.target_encoded = self._encode_pairs(self.target_rows, hp.target) if hp.target else ([], [])
        self.eval_rows = load_sft(hp.eval_sft, self.cols) if hp.eval_sft else []
        self.eval_encoded = self._encode_sft(self.eval_rows, hp.eval_sft) if hp.eval_sft else []
        self.eval_pair_rows = load_pairs(hp.eval_pairs, self.cols) if hp.eval_pairs else []
        self.eval_pair_encoded = (self._encode_pairs(self.eval_pair_rows, hp.eval_pairs)
                                  if hp.eval_pairs else ([], []))
        self._ready = True

    def setup(self, stage: str | None = None) -> None:
        self.load()
        if stage == "fit" and self.hparams.train_on == "selection":
            self.ensure_selection()

    def selection_path(self) -> Path:
        hp = self.hparams
        if hp.selection_file:
            return Path(hp.selection_file)
        if hp.selection_dir:
            return Path(hp.selection_dir) / hp.selection_mode / "selected.jsonl"
        raise DataFormatError("data.train_on=selection needs data.selection_file or data.selection_dir (written "
                              "by `prism_lightning select`)")

    def ensure_selection(self) -> Path:
        """The selection file; computed on rank 0 (others wait at a barrier) when it is missing."""
        path, hp = self.selection_path(), self.hparams
        trainer = self.trainer
        if not path.exists() and hp.features_dir and (trainer is None or trainer.is_global_zero):
            from prism_lightning.select import run_selection

            run_selection(hp.features_dir, Path(path).parent.parent, [hp.selection_mode],
                          self.selection_args or SelectionArgs(), self.pool_rows, self.target_rows)
        if trainer is not None:
            trainer.strategy.barrier("selection")
        if not path.exists():
            raise FileNotFoundError(f"{path}: no selection; run `prism_lightning select` or set data.features_dir")
        return path

    # ----- row subsets ---------------------------------------------------------------------
    def warmup_indices(self) -> list[int]:
        """Seeded random ``warmup_fraction`` of the pool (at least one row), in pool order."""
        n = len(self.pool_rows)
        k = max(1, round(self.hparams.warmup_fraction * n))
        return sorted(random.Random(self.hparams.seed).sample(range(n), k))

    def selection_indices(self) -> list[int]:
        """Pool rows listed (by ``id``) in the selection file."""
        path = self.selection_path()
        ids = [r.id for r in load_sft(path, self.cols)] if path.suffix != ".txt" else \
            [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        by_id = {r.id: i for i, r in enumerate(self.pool_rows)}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DataFormatError(f"{path}: {len(missing)} ids are not in the pool {self.hparams.pool} "
                                  f"(first: {missing[0]!r}); the selection was made for another pool")
        if not ids:
            raise DataFormatError(f"{path}: the selection is empty")
        return sorted(by_id[i] for i in ids)

    def train_indices(self) -> list[int]:
        mode = self.hparams.train_on
        if mode == "warmup":
            return self.warmup_indices()
        if mode == "selection":
            return self.selection_indices()
        return list(range(len(self.pool_rows)))

    # ----- loaders -------------------------------------------------------------------------
    def _loader(self, dataset, collate, batch_size: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        self.load()
        ds = SFTDataset(self.pool_encoded, self.train_indices())
        hp = self.hparams
        split = {"num_replicas": 1, "rank": 0}
        if self.trainer is not None:
            split = {k: v for k, v in (self.trainer.distributed_sampler_kwargs or {}).items()
                     if k in split} or split
        sampler = GlobalBatchSampler(len(ds), hp.batch_size, shuffle=hp.shuffle, seed=hp.seed, **split)
        return DataLoader(ds, batch_size=hp.batch_size, sampler=sampler, num_workers=hp.num_workers,
                          collate_fn=SFTCollator(self.tokenizer.pad_token_id))

    def _eval_loaders(self) -> list[DataLoader]:
        self.load()
        pad = self.tokenizer.pad_token_id
        loaders = []
        if self.eval_rows:
            loaders.append(self._loader(SFTDataset(self.eval_encoded), SFTCollator(pad),
                                        self.hparams.eval_batch_size))
        if self.eval_pair_rows:
            loaders.append(self._loader(PairDataset(*self.eval_pair_encoded), PairCollator(pad),
                                        self.hparams.eval_batch_size))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def split_dataset(self, split: str):
        """The dataset and collate function of a prediction split (``pool`` or ``target``)."""
        self.load()
        pad = self.tokenizer.pad_token_id
        if split == "pool":
            return SFTDataset(self.pool_encoded), SFTCollator(pad)
        if split == "target":
            if not self.target_rows:
                raise DataFormatError("data.target is not set: target pairs are needed for target features")
            return PairDataset(*self.target_encoded), PairCollator(pad)
        raise ValueError(f"unknown split {split!r}")

    def fingerprint(self, split: str) -> str:
        """sha256 of a split's token ids and prompt lengths (changes with data, tokenizer or truncation)."""
        import hashlib

        self.load()
        h = hashlib.sha256()
        groups = [self.pool_encoded] if split == "pool" else list(self.target_encoded)
        for group in groups:
            for e in group:
                h.update(str(e.prompt_len).encode())
                h.update(torch.tensor(e.input_ids, dtype=torch.int64).numpy().tobytes())
        return h.hexdigest()

    def predict_dataloader(self) -> list[DataLoader]:
        """One loader per ``PredictTask`` (default: every shard of pool and target)."""
        self.load()
        plan = self.predict_plan
        if plan is None:
            plan = [PredictTask("", s, list(range(num_shards(len(self.split_dataset(s)[0]),
                                                           self.hparams.shard_size))))
                    for s in ("pool", "target") if s == "pool" or self.target_rows]
        loaders = []
        for task in plan:
            ds, collate = self.split_dataset(task.split)
            batches = ShardBatches(ds, collate, task.shards, self.hparams.shard_size,
                                   self.hparams.eval_batch_size)
            loaders.append(DataLoader(batches, batch_size=None, num_workers=self.hparams.num_workers))
        return loaders
