"""The on-disk feature store: ``shard-XXXXX.safetensors`` files plus a ``manifest.json``.

Layout per checkpoint and split: ``features/epoch-N/pool/`` and ``features/epoch-N/target/``.
Shard ``j`` holds rows ``[j * shard_size, (j + 1) * shard_size)`` of the split's dataset, so a
store is the same whatever the batch size or number of processes that wrote it.

- pool shards: ``features`` [n, k], ``loss`` [n] (token-mean response loss), ``index`` [n] int64.
- target shards: ``chosen`` [n, k], ``rejected`` [n, k], ``lbar_chosen`` [n], ``lbar_rejected`` [n],
  ``index`` [n] int64.

``manifest.json`` holds the settings that produced the store (model, adapter path and sha256,
dataset fingerprint, projection, preconditioner, normalisation, dtype, shard size, rows) and,
once every shard exists, ``complete: true``. Readable with ``safetensors`` and ``json`` alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prism_lightning.errors import StoreMismatchError
from prism_lightning.io import atomic_file

FORMAT_VERSION = 1
# Settings that must agree for shards to be reused or scored together.
IDENTITY_KEYS = ("format", "split", "model", "adapter_sha256", "dataset_fingerprint", "projection",
                 "preconditioner", "normalize", "dtype", "shard_size", "rows")


def shard_rows(shard: int, shard_size: int, n_rows: int) -> range:
    """Row indices of shard ``shard``: ``[shard * size, min((shard + 1) * size, n))``."""
    return range(shard * shard_size, min((shard + 1) * shard_size, n_rows))


def num_shards(n_rows: int, shard_size: int) -> int:
    return (n_rows + shard_size - 1) // shard_size


@dataclass
class PredictTask:
    """One pass of the feature stage: the shards of ``split`` (``pool``/``target``) to compute at checkpoint ``tag``."""

    tag: str
    split: str
    shards: list[int] = field(default_factory=list)


def shard_path(folder: str | Path, shard: int) -> Path:
    return Path(folder) / f"shard-{shard:05d}.safetensors"


def write_shard(folder: str | Path, shard: int, tensors: dict[str, torch.Tensor]) -> Path:
    """Save one shard atomically (``io.atomic_file``)."""
    path = shard_path(folder, shard)
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    return path


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def check_settings(folder: str | Path, settings: dict) -> None:
    """Refuse a store whose manifest disagrees with ``settings``, naming each differing key."""
    found = read_manifest(folder)
    if found is None:
        return
    diffs = [f"{k}: store has {found.get(k)!r}, now {settings.get(k)!r}"
             for k in IDENTITY_KEYS if found.get(k) != settings.get(k)]
    if diffs:
        raise StoreMismatchError(
            f"{folder} was written with other settings ({'; '.join(diffs)}). Use another output_dir, "
            "or delete the store (or pass --force to the pipeline) to recompute it.")


def complete_shards(folder: str | Path, n_shards: int) -> set[int]:
    """Shards already on disk (complete by construction: written atomically)."""
    return {j for j in range(n_shards) if shard_path(folder, j).exists()}


class FeatureStore:
    """Lazy, memory-mapped reader of one store folder, rows in index order."""

    def __init__(self, folder: str | Path, require_complete: bool = True):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if self.manifest is None:
            raise FileNotFoundError(f"{self.folder}: no manifest.json; run feature extraction first")
        if require_complete and not self.manifest.get("complete"):
            raise StoreMismatchError(f"{self.folder}: the store is incomplete (an interrupted extraction?); "
                                     "rerun the predict stage to finish it")
        self.shards = sorted(self.folder.glob("shard-*.safetensors"))

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def iter_shards(self, names: list[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """One dict of tensors per shard, in row order; tensors are read from the memory map."""
        for path in self.shards:
            with safe_open(str(path), framework="pt") as fh:
                keys = names or list(fh.keys())
                yield {k: fh.get_tensor(k) for k in keys}

    def iter_chunks(self, names: list[str], rows: int) -> Iterator[dict[str, torch.Tensor]]:
        """Chunks of at most ``rows`` rows (memory bounded by ``rows x k``), in row order."""
        for shard in self.iter_shards(names):
            n = shard[names[0]].shape[0]
            for s in range(0, n, rows):
                yield {k: v[s: s + rows] for k, v in shard.items()}

    def load(self, name: str) -> torch.Tensor:
        """One field of every row, concatenated (small fields, or small stores)."""
        return torch.cat([s[name] for s in self.iter_shards([name])])
