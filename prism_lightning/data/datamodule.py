"""``PrismDataModule``: one data module for warmup, gradient features and the final fine-tune."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader

from prism_lightning import DEMO_DATA
from prism_lightning.config import Columns, DataSource, ModelArgs
from prism_lightning.data.datasets import PairCollator, PairDataset, SFTCollator, SFTDataset
from prism_lightning.data.encoding import EncodedRows, encode_rows
from prism_lightning.data.formats import load_pairs, load_sft, rows_digest
from prism_lightning.data.samplers import GlobalBatchSampler, ShardBatches
from prism_lightning.errors import DataFormatError
from prism_lightning.io import json_digest
from prism_lightning.modeling import load_tokenizer
from prism_lightning.store.feature_store import PredictTask, num_shards


class PrismDataModule(L.LightningDataModule):
    """Pool, target pairs and evaluation sets for every stage.

    Args:
        pool: candidate SFT rows (``id``, ``prompt``, ``completion``, ``subtask``; or messages/text): a file
            or folder, or a ``load_dataset`` spec (``{path: json, data_files: ..., split: train}``, a hub id
            with ``name``/``split``, a ``save_to_disk`` folder with ``split``). So are the three below.
        target: target preference pairs (``prompt``, ``chosen``, ``rejected``, ``subtask``).
        eval_sft: held-out SFT rows for validation/test (exact match, loss).
        eval_pairs: held-out preference pairs for validation/test (preference accuracy).
        tokenizer: tokenizer path or hub id (linked to ``model.model.name_or_path`` by the CLI).
        train_on: ``warmup`` (seeded ``warmup_fraction`` of the pool), ``pool`` (all of it)
            or ``selection`` (the rows of ``selection_file``, written by the ``select`` stage).
        warmup_fraction: share of the pool the warmup trains on (``train_on: warmup``).
        seed: seed of the warmup subset and of the training order.
        max_length / truncation: token budget per row; ``left`` cuts the prompt, ``error`` refuses.
        batch_size: training rows per step and rank (global batch = batch_size x devices x
            num_nodes x accumulate_grad_batches).
        shuffle: reshuffle the training rows each epoch (seeded; ``false`` keeps pool order).
        group_by_length: training steps of rows of similar length (``batch_size`` rows each, seeded groups of
            ``length_group_size`` global batches sorted by length, batches shuffled; see ``data.samplers``):
            less padding; each row still seen once per epoch, the global batches independent of the process count.
        length_group_size: global batches per length group (``group_by_length``); larger groups pad less and mix less.
        max_tokens_per_batch: feature extraction in batches of similar length: each shard's rows sorted by length
            and packed up to this many padded tokens (a target pair counts both answers), at most
            ``eval_batch_size`` rows. The store is the same whatever the batching. None: ``eval_batch_size`` rows
            in row order, padded to the longest.
        eval_batch_size: rows per evaluation and feature-extraction batch.
        num_workers: DataLoader worker processes.
        shard_size: rows per feature-store shard (prediction splits work by whole shards).
        selection_file: rows to train on with ``train_on: selection``: a ``selected.jsonl`` written by
            ``python -m prism_lightning select`` (``<output_dir>/selection/<mode>/selected.jsonl``),
            or a ``.txt`` file of ids, one per line.
        cache_dir: where tokenized splits are cached (default ``$PRISM_CACHE`` or ``~/.cache/prism_lightning``).
        tokenize_workers: processes for the tokenization ``datasets.map`` (its ``num_proc``).

    ``set_train_rows(indices)`` replaces the training rows; a callback can call it between epochs
    (with ``trainer.reload_dataloaders_every_n_epochs: 1`` so the next epoch's loader is rebuilt).
    """

    def __init__(self, pool: DataSource = f"{DEMO_DATA}/pool.jsonl",
                 target: DataSource | None = f"{DEMO_DATA}/target_pairs.jsonl",
                 eval_sft: DataSource | None = f"{DEMO_DATA}/eval.jsonl",
                 eval_pairs: DataSource | None = f"{DEMO_DATA}/eval_pairs.jsonl",
                 tokenizer: str | None = None, columns: Columns | None = None,
                 train_on: Literal["warmup", "pool", "selection"] = "warmup", warmup_fraction: float = 0.05,
                 seed: int = 0, max_length: int = 256, truncation: Literal["left", "error"] = "left",
                 batch_size: int = 8, eval_batch_size: int = 16, num_workers: int = 0, shard_size: int = 256,
                 selection_file: str | None = None, shuffle: bool = True, cache_dir: str | None = None,
                 tokenize_workers: int = 1, group_by_length: bool = False, length_group_size: int = 64,
                 max_tokens_per_batch: int | None = None):
        super().__init__()
        if train_on not in ("warmup", "pool", "selection"):
            raise ValueError(f"data.train_on={train_on!r} must be 'warmup', 'pool' or 'selection'")
        if not 0 < warmup_fraction <= 1:
            raise ValueError(f"data.warmup_fraction={warmup_fraction} must be in (0, 1]")
        if max_tokens_per_batch is not None and max_tokens_per_batch < max_length:
            raise ValueError(f"data.max_tokens_per_batch={max_tokens_per_batch} must be at least data.max_length="
                             f"{max_length} (a row of max_length tokens must fit a batch); raise it or unset it")
        if length_group_size < 1:
            raise ValueError(f"data.length_group_size={length_group_size} must be >= 1")
        self.save_hyperparameters()
        self.cols = Columns(**columns) if isinstance(columns, dict) else (columns or Columns())
        self.predict_plan: list[PredictTask] | None = None
        self.train_rows: list[int] | None = None
        self._tokenizer = None
        self._ready = False

    # ----- loading -------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            name = self.hparams.tokenizer
            module = self.trainer.lightning_module if self.trainer is not None else None
            if name is None and getattr(module, "model_args", None) is not None:
                name = module.model_args.name_or_path  # the model being trained or scored
            name = name or ModelArgs().name_or_path
            self._tokenizer = load_tokenizer(ModelArgs(name_or_path=name))
        return self._tokenizer

    def _encode(self, rows, side: str, where) -> EncodedRows:
        hp = self.hparams
        encoded, digest = encode_rows(rows, side, self.tokenizer, hp.max_length, hp.truncation, where,
                                      hp.cache_dir, hp.tokenize_workers)
        self._digests.setdefault(id(rows), []).append(digest)
        return encoded

    def load(self) -> None:
        """Read, validate and tokenize every configured file (once; before any compute; cached on disk)."""
        if self._ready:
            return
        hp, self._digests = self.hparams, {}
        self.pool_rows = load_sft(hp.pool, self.cols)
        self.pool_encoded = self._encode(self.pool_rows, "completion", hp.pool)
        self.target_rows = load_pairs(hp.target, self.cols) if hp.target else []
        self.target_encoded = ((self._encode(self.target_rows, "chosen", hp.target),
                                self._encode(self.target_rows, "rejected", hp.target)) if hp.target else ([], []))
        self.eval_rows = load_sft(hp.eval_sft, self.cols) if hp.eval_sft else []
        self.eval_encoded = self._encode(self.eval_rows, "completion", hp.eval_sft) if hp.eval_sft else []
        self.eval_pair_rows = load_pairs(hp.eval_pairs, self.cols) if hp.eval_pairs else []
        self.eval_pair_encoded = ((self._encode(self.eval_pair_rows, "chosen", hp.eval_pairs),
                                   self._encode(self.eval_pair_rows, "rejected", hp.eval_pairs))
                                  if hp.eval_pairs else ([], []))
        self._ready = True

    def prepare_data(self) -> None:
        """Lightning runs this on one process per node first: it fills the tokenization cache the others load."""
        self.load()

    def setup(self, stage: str | None = None) -> None:
        self.load()

    def selection_path(self) -> Path:
        if not self.hparams.selection_file:
            raise DataFormatError("data.train_on=selection needs data.selection_file: the selected.jsonl written by "
                                  "`python -m prism_lightning select` (<output_dir>/selection/<mode>/selected.jsonl)")
        path = Path(self.hparams.selection_file)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no selection file; run `python -m prism_lightning select` first "
                                    "or fix data.selection_file")
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
        made = path.parent / "manifest.json"  # written by `select` beside selected.jsonl
        if made.exists() and json.loads(made.read_text()).get("pool_sha256") not in (None, rows_digest(self.pool_rows)):
            raise DataFormatError(f"{path} was selected from another pool than data.pool={self.hparams.pool} (its "
                                  f"{made.name} records other rows); rerun `select` for this pool or point data.pool "
                                  "at the pool it was made from")
        by_id = {r.id: i for i, r in enumerate(self.pool_rows)}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DataFormatError(f"{path}: {len(missing)} ids are not in the pool {self.hparams.pool} "
                                  f"(first: {missing[0]!r}); the selection was made for another pool")
        if not ids:
            raise DataFormatError(f"{path}: the selection is empty")
        return sorted(by_id[i] for i in ids)

    def set_train_rows(self, indices: list[int]) -> None:
        """Train on these pool rows from the next training loader on (e.g. set by a callback between epochs)."""
        n = len(self.pool_rows)
        bad = [i for i in indices if not 0 <= i < n]
        if bad or not indices:
            raise ValueError(f"set_train_rows: {len(bad)} indices outside the pool of {n} rows (first: "
                             f"{bad[:1]})" if bad else "set_train_rows: no rows")
        self.train_rows = sorted(indices)

    def train_indices(self) -> list[int]:
        if self.train_rows is not None:
            return self.train_rows
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
        sampler = GlobalBatchSampler(len(ds), hp.batch_size, shuffle=hp.shuffle, seed=hp.seed,
                                     lengths=ds.lengths() if hp.group_by_length else None,
                                     group_size=hp.length_group_size, **split)
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
        """The dataset and collate function of a prediction split (``pool``, ``target`` or ``warmup``)."""
        self.load()
        pad = self.tokenizer.pad_token_id
        if split == "pool":
            return SFTDataset(self.pool_encoded), SFTCollator(pad)
        if split == "warmup":  # the rows the warmup trains on (the curvature stage fits on them)
            return SFTDataset(self.pool_encoded, self.warmup_indices()), SFTCollator(pad)
        if split == "target":
            if not self.target_rows:
                raise DataFormatError("data.target is not set: target pairs are needed for target features")
            return PairDataset(*self.target_encoded), PairCollator(pad)
        raise ValueError(f"unknown split {split!r}")

    def source_digest(self, split: str) -> str:
        """``rows_digest`` of a split's parsed rows (``pool`` or ``target``)."""
        self.load()
        return rows_digest(self.pool_rows if split == "pool" else self.target_rows)

    def tokenization(self) -> dict:
        """The settings besides the rows and the tokenizer that decide a row's token ids."""
        return {"max_length": self.hparams.max_length, "truncation": self.hparams.truncation}

    def fingerprint(self, split: str) -> str:
        """Token fingerprint of a split (``pool`` or ``target``): the digest of its cached encoding, which
        changes with the rows, the tokenizer, ``max_length`` or ``truncation``."""
        self.load()
        rows = self.pool_rows if split == "pool" else self.target_rows
        return json_digest(self._digests[id(rows)])

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
                                   self.hparams.eval_batch_size, self.hparams.max_tokens_per_batch)
            loaders.append(DataLoader(batches, batch_size=None, num_workers=self.hparams.num_workers))
        return loaders
