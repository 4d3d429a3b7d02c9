"""Token ids of a whole split, computed once with ``datasets.map`` and cached on disk.

The cache file is named by a digest of what decides the ids: the parsed rows (``rows_digest``), the
tokenizer (its vocabulary, merges, special tokens and chat template), ``max_length``, ``truncation``
and the package version. So every stage and every rank reuses one computation: Lightning runs
``prepare_data`` (which fills the cache) on one process per node before ``setup`` (which loads it) on
all of them. The cached table is memory-mapped Arrow: ids are read as batches need them.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from prism_lightning import __version__
from prism_lightning.data.formats import PairRow, SFTRow, rows_digest
from prism_lightning.data.tokenize import Encoded, Encoder, truncation_warning
from prism_lightning.errors import SettingsError
from prism_lightning.io import json_digest


def cache_root(folder: str | None = None) -> Path:
    """``folder``, else ``$PRISM_CACHE``, else ``$XDG_CACHE_HOME/prism_lightning`` (``~/.cache``); refused when it
    exists and is not a folder."""
    if folder:
        root, what = Path(folder), "data.cache_dir"
    elif os.environ.get("PRISM_CACHE"):
        root, what = Path(os.environ["PRISM_CACHE"]), "PRISM_CACHE"
    else:
        root, what = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prism_lightning", "the cache"
    if root.exists() and not root.is_dir():
        raise SettingsError(f"{what}={root} is not a folder; point it at a folder for the tokenization cache")
    return root


def tokenizer_identity(tokenizer) -> str:
    """sha256 of what makes a tokenizer produce its ids: the backend's JSON, special tokens, chat template."""
    backend = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer)
    state = {"backend": hashlib.sha256(backend.encode()).hexdigest(), "class": type(tokenizer).__name__,
             "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
             "chat_template": getattr(tokenizer, "chat_template", None)}
    return json_digest(state)


def _encode_batch(batch: dict, tokenizer, max_length: int, truncation: str, where: str, all_turns: bool) -> dict:
    """``datasets.map`` function: one batch of (prompt, response) rows to ids; names a bad row."""
    enc = Encoder(tokenizer, max_length, truncation, all_turns=all_turns)
    out = {"input_ids": [], "prompt_len": [], "turns": [], "truncated": []}
    for row, rid, prompt, response in zip(batch["row"], batch["id"], batch["prompt"], batch["response"]):
        before = enc.truncated
        e = enc.encode(json.loads(prompt), response, f"{where}: row {row + 1} (id {rid})")
        out["input_ids"].append(e.input_ids)
        out["prompt_len"].append(e.prompt_len)
        out["turns"].append(e.turns)
        out["truncated"].append(enc.truncated > before)
    return out


def _features():
    """The cached table's columns and types, fixed: a batch of rows without assistant turns and one with them must
    store the same type."""
    import datasets

    ints = datasets.Sequence(datasets.Value("int64"))
    return datasets.Features({"input_ids": ints, "prompt_len": datasets.Value("int64"),
                              "turns": datasets.Sequence(ints), "truncated": datasets.Value("bool")})


class EncodedRows(Sequence):
    """Encoded rows of one split side (pool rows, or the chosen or the rejected answers of pairs)."""

    def __init__(self, table):
        self.table = table
        self._lengths = None

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> Encoded:
        row = self.table[int(i)]
        return Encoded(row["input_ids"], row["prompt_len"], row["turns"])

    def lengths(self, rows: range | None = None) -> list[int]:
        """Tokens per row (of ``rows``, default all), read from the Arrow column's offsets: no ids decoded."""
        import pyarrow.compute as pc

        column = self.table.data.column("input_ids")
        if rows is not None:
            return pc.list_value_length(column.slice(rows.start, len(rows))).to_numpy().tolist()
        if self._lengths is None:  # int32, 4 bytes a row
            self._lengths = pc.list_value_length(column).to_numpy()
        return self._lengths.tolist()


def encode_rows(rows: list[SFTRow] | list[PairRow], side: str, tokenizer, max_length: int, truncation: str,
                where: str, cache_dir: str | None = None, workers: int = 1,
                all_turns: bool = False) -> tuple[EncodedRows, str]:
    """The cached encoding of ``rows`` (``side``: ``completion``, ``chosen`` or ``rejected``) and its digest.

    The digest names the cache file and is the split's token fingerprint in feature-store manifests.
    """
    import datasets

    digest = json_digest({"rows": rows_digest(rows), "side": side, "tokenizer": tokenizer_identity(tokenizer),
                          "max_length": max_length, "truncation": truncation, "all_turns": all_turns,
                          "version": __version__, "format": 2})
    # one folder per datasets release: an Arrow file's feature metadata written by one release may not load in
    # another (e.g. 4.x's List type in 3.x), while the ids, hence the digest, are the same
    path = cache_root(cache_dir) / "tokenized" / f"datasets-{datasets.__version__}" / f"{digest}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    source = datasets.Dataset.from_dict({
        "row": list(range(len(rows))), "id": [r.id for r in rows],
        "prompt": [json.dumps(r.prompt) for r in rows], "response": [getattr(r, side) for r in rows]})
    table = source.map(_encode_batch, batched=True, batch_size=1000, num_proc=workers if workers > 1 else None,
                       fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "truncation": truncation,
                                  "where": str(where), "all_turns": all_turns},
                       remove_columns=source.column_names, cache_file_name=str(path), load_from_cache_file=True,
                       new_fingerprint=digest, desc=f"tokenizing {side}s", features=_features())
    truncated = sum(table["truncated"])
    if truncated:
        warnings.warn(truncation_warning(str(where), truncated, max_length), stacklevel=2)
    return EncodedRows(table.select_columns(["input_ids", "prompt_len", "turns"])), digest
