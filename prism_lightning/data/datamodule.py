"""``PrismDataModule``: one data module for warmup, curvature, gradient features and the final fine-tune.

Its settings are ``config.DataArgs`` (``--data.*``, checked when parsed). What a stage brings is passed in
with ``connect`` (the tokenizer of the model being trained or scored, a feature stage's plan of shards),
never read from the trainer's module. With ``data.selection`` the data module computes the rows a
fine-tune trains on in ``setup("fit")``, on every rank (``select.training_rows``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from prism_lightning.config import DataArgs, ModelArgs
from prism_lightning.data.datasets import PairCollator, PairDataset, SFTCollator, SFTDataset
from prism_lightning.data.encoding import EncodedRows, encode_rows
from prism_lightning.data.formats import PoolIndex, load_pairs, load_sft, rows_digest
from prism_lightning.data.samplers import GlobalBatchSampler, ShardBatches
from prism_lightning.errors import DataFormatError, SettingsError
from prism_lightning.io import json_digest
from prism_lightning.modeling import load_tokenizer
from prism_lightning.provenance import Manifest
from prism_lightning.ranks import Ranks
from prism_lightning.store.feature_store import PredictTask, num_shards


@dataclass(eq=False)
class PrismDataModule(DataArgs, L.LightningDataModule):
    """Pool, target pairs and evaluation sets for every stage (settings: ``config.DataArgs``).

    ``train_on`` picks the training rows: ``warmup`` (a seeded ``warmup_fraction`` of the pool), ``pool``, or
    ``selection`` (computed from feature stores with ``selection``, or read from ``selection_file``).
    ``set_train_rows(indices)`` replaces them; a callback can call it between epochs (with
    ``trainer.reload_dataloaders_every_n_epochs: 1`` so the next epoch's loader is rebuilt).
    Evaluation batches carry each row's ``subtask``, ``prompt_ids`` and reference answer text(s).
    """

    def __post_init__(self) -> None:
        DataArgs.__post_init__(self)
        L.LightningDataModule.__init__(self)
        # prediction gives each rank whole shards: a rank may have no batch of a (checkpoint, split) pass
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.predict_plan: list[PredictTask] | None = None
        self.train_rows: list[int] | None = None
        self._tok = None
        self._tok_name: str | None = None
        self._ready = False

    # ----- what a stage brings -------------------------------------------------------------
    def connect(self, tokenizer=None, predict_plan: list[PredictTask] | None = None) -> None:
        """The tokenizer of the model being trained or scored (a loaded tokenizer, or its path or hub id; the
        ``tokenizer`` setting wins) and a feature or curvature stage's plan of shards to predict."""
        if tokenizer is not None and self.tokenizer is None:
            if isinstance(tokenizer, str):
                self._tok_name = tokenizer
            else:
                self._tok = tokenizer
        if predict_plan is not None:
            self.predict_plan = predict_plan

    @property
    def tok(self):
        """The tokenizer: ``data.tokenizer``, else the one ``connect`` was given."""
        if self._tok is None:
            name = self.tokenizer or self._tok_name
            if name is None:
                raise SettingsError("data: no tokenizer; set data.tokenizer, or connect the model's "
                                    "(PrismDataModule.connect(tokenizer=...); the CLI and the pipeline do)")
            self._tok = load_tokenizer(ModelArgs(name_or_path=name))
        return self._tok

    # ----- loading -------------------------------------------------------------------------
    def _encode(self, rows, side: str, where) -> EncodedRows:
        encoded, digest = encode_rows(rows, side, self.tok, self.max_length, self.truncation, where,
                                      self.cache_dir, self.tokenize_workers,
                                      all_turns=self.chat_loss == "all_assistant_turns" and side == "completion")
        self._digests.setdefault(id(rows), []).append(digest)
        return encoded

    def load(self) -> None:
        """Read, validate and tokenize every configured file (once; before any compute; cached on disk)."""
        if self._ready:
            return
        self._digests: dict = {}
        self.pool_rows = load_sft(self.pool, self.columns_of("pool"))
        self.pool_encoded = self._encode(self.pool_rows, "completion", self.pool)
        self.target_rows = load_pairs(self.target, self.columns_of("target")) if self.target else []
        self.target_encoded = ((self._encode(self.target_rows, "chosen", self.target),
                                self._encode(self.target_rows, "rejected", self.target)) if self.target else ([], []))
        self.eval_rows = load_sft(self.eval_sft, self.columns_of("eval_sft")) if self.eval_sft else []
        self.eval_encoded = self._encode(self.eval_rows, "completion", self.eval_sft) if self.eval_sft else []
        self.eval_pair_rows = load_pairs(self.eval_pairs, self.columns_of("eval_pairs")) if self.eval_pairs else []
        self.eval_pair_encoded = ((self._encode(self.eval_pair_rows, "chosen", self.eval_pairs),
                                   self._encode(self.eval_pair_rows, "rejected", self.eval_pairs))
                                  if self.eval_pairs else ([], []))
        for rows, (chosen, rejected), source in ((self.target_rows, self.target_encoded, self.target),
                                                  (self.eval_pair_rows, self.eval_pair_encoded, self.eval_pairs)):
            same = next((i for i in range(len(rows)) if chosen[i].input_ids == rejected[i].input_ids), None)
            if same is not None:
                raise DataFormatError(f"{source}: row {same + 1} (id {rows[same].id}): chosen and rejected are the "
                                      f"same {len(chosen[same].input_ids)} tokens once tokenized with max_length="
                                      f"{self.max_length}; the pair contrasts nothing: raise data.max_length or fix "
                                      "the pair")
        self._ready = True

    def prepare_data(self) -> None:
        """Lightning runs this on one process per node first: it fills the tokenization cache the others load."""
        self.load()

    def setup(self, stage: str | None = None) -> None:
        self.load()
        if stage == "fit" and self.selection is not None and self.train_rows is None:
            from prism_lightning.select import training_rows  # the selection stage's code, on every rank

            pool = PoolIndex.from_rows(self.pool_rows, self.selection.label)
            strategy = self.trainer.strategy if self.trainer is not None else None
            self.train_rows = training_rows(self.selection, pool, self.target_rows, Ranks.of(strategy))

    # ----- row subsets ---------------------------------------------------------------------
    def warmup_indices(self) -> list[int]:
        """Seeded random ``warmup_fraction`` of the pool (at least one row), in pool order."""
        n = len(self.pool_rows)
        k = max(1, round(self.warmup_fraction * n))
        return sorted(random.Random(self.seed).sample(range(n), k))

    def selection_indices(self) -> list[int]:
        """Pool rows listed (by ``id``) in ``selection_file``."""
        path = Path(self.selection_file)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no selection file; run `python -m prism_lightning select` first, "
                                    "give data.selection to compute it here, or fix data.selection_file")
        # selected.jsonl is written with the canonical column names (``id``), whatever the pool's
        ids = [r.id for r in load_sft(path)] if path.suffix != ".txt" else \
            [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        made = Manifest.read(path.parent / "manifest.json")  # written by `select` beside selected.jsonl
        if made is not None and made.get("pool_sha256") is not None:
            made.check({"pool_sha256": rows_digest(self.pool_rows)}, what=str(path), error=DataFormatError,
                       fix=f"it was selected from another pool than data.pool={self.pool}; rerun `select` for this "
                           "pool or point data.pool at the pool it was made from")
        by_id = {r.id: i for i, r in enumerate(self.pool_rows)}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DataFormatError(f"{path}: {len(missing)} ids are not in the pool {self.pool} "
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
        if self.train_on == "warmup":
            return self.warmup_indices()
        if self.train_on == "selection":
            return self.selection_indices()
        return list(range(len(self.pool_rows)))

    # ----- loaders -------------------------------------------------------------------------
    def _loader(self, dataset, collate, batch_size: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        self.load()
        ds = SFTDataset(self.pool_encoded, self.train_indices())
        split = {"num_replicas": 1, "rank": 0}
        if self.trainer is not None:
            split = {k: v for k, v in (self.trainer.distributed_sampler_kwargs or {}).items()
                     if k in split} or split
        sampler = GlobalBatchSampler(len(ds), self.batch_size, shuffle=self.shuffle, seed=self.seed,
                                     lengths=ds.lengths() if self.group_by_length else None,
                                     group_size=self.length_group_size, **split)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=SFTCollator(self.tok.pad_token_id))

    def eval_subtasks(self) -> list[str]:
        """The subtasks of the evaluation rows and pairs (the metrics a module keeps per subtask)."""
        self.load()
        return sorted({r.subtask for r in self.eval_rows} | {r.subtask for r in self.eval_pair_rows})

    def _eval_loaders(self) -> list[DataLoader]:
        self.load()
        pad = self.tok.pad_token_id
        loaders = []
        if self.eval_rows:
            loaders.append(self._loader(SFTDataset(self.eval_encoded), SFTCollator(pad, self.eval_rows),
                                        self.eval_batch_size))
        if self.eval_pair_rows:
            loaders.append(self._loader(PairDataset(*self.eval_pair_encoded), PairCollator(pad, self.eval_pair_rows),
                                        self.eval_batch_size))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def split_dataset(self, split: str):
        """The dataset and collate function of a prediction split (``pool``, ``target`` or ``warmup``)."""
        self.load()
        pad = self.tok.pad_token_id
        if split == "pool":  # features: packed without padding when data.padding_free
            return SFTDataset(self.pool_encoded), SFTCollator(pad, packed=self.padding_free)
        if split == "warmup":  # the rows the warmup trains on (the curvature stage fits on them, padded)
            return SFTDataset(self.pool_encoded, self.warmup_indices()), SFTCollator(pad)
        if split == "target":
            if not self.target_rows:
                raise DataFormatError("data.target is not set: target pairs are needed for target features")
            return PairDataset(*self.target_encoded), PairCollator(pad, packed=self.padding_free)
        raise ValueError(f"unknown split {split!r}")

    def source_digest(self, split: str) -> str:
        """``rows_digest`` of a split's parsed rows (``pool`` or ``target``)."""
        self.load()
        return rows_digest(self.pool_rows if split == "pool" else self.target_rows)

    def source_record(self, split: str):
        """The data setting of a split as a store records it: an absolute path, or a ``load_dataset`` spec."""
        source = self.pool if split == "pool" else self.target
        return source if isinstance(source, dict) else str(Path(source).resolve())

    def tokenization(self) -> dict:
        """The settings besides the rows and the tokenizer that decide a row's token ids and labels."""
        return {"max_length": self.max_length, "truncation": self.truncation, "chat_loss": self.chat_loss}

    def fingerprint(self, split: str) -> str:
        """Token fingerprint of a split (``pool`` or ``target``): the digest of its cached encoding, which
        changes with the rows, the tokenizer, ``max_length`` or ``truncation``."""
        self.load()
        rows = self.pool_rows if split == "pool" else self.target_rows
        return json_digest(self._digests[id(rows)])

    def predict_dataloader(self) -> list[DataLoader]:
        """One loader per ``PredictTask`` of the connected plan (default: every shard of pool and target)."""
        self.load()
        plan = self.predict_plan
        if plan is None:
            plan = [PredictTask("", s, list(range(num_shards(len(self.split_dataset(s)[0]), self.shard_size))))
                    for s in ("pool", "target") if s == "pool" or self.target_rows]
        loaders = []
        for task in plan:
            ds, collate = self.split_dataset(task.split)
            batches = ShardBatches(ds, collate, task.shards, self.shard_size, self.eval_batch_size,
                                   self.max_tokens_per_batch)
            loaders.append(DataLoader(batches, batch_size=None, num_workers=self.num_workers))
        return loaders
