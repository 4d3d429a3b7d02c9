"""The on-disk feature store: ``shard-XXXXX.safetensors`` files plus a ``manifest.json``.

Layout per checkpoint and split: ``features/epoch-N/pool/`` and ``features/epoch-N/target/``.
Shard ``j`` holds rows ``[j * shard_size, (j + 1) * shard_size)`` of the split's dataset, so a
store is the same whatever the batch size or number of processes that wrote it.

- pool shards: ``features`` [n, k], ``loss`` [n] (token-mean response loss), ``index`` [n] int64.
- target shards: ``chosen`` [n, k], ``rejected`` [n, k], ``lbar_chosen`` [n], ``lbar_rejected`` [n],
  ``index`` [n] int64.

``manifest.json`` holds the settings that produced the store (model, adapter path and sha256,
dataset fingerprint, projection, preconditioner, normalisation, dtype, shard size, rows) and,
once every shard exists, ``complete: true`` and ``shards``: per shard its file, sha256, size in
bytes, row count and first/last row index. Each shard is written with a ``shard-XXXXX.json``
record of the same fields (so ranks that write shards need not share state); the manifest gathers
them. Readers check every shard's size (always) and hash (``verify``), and no stored number may be
NaN or Inf. Readable with ``safetensors`` and ``json`` alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from prism_lightning.errors import NonFiniteError, StoreCorruptError, StoreMismatchError
from prism_lightning.io import atomic_file, atomic_write_text, file_sha256, read_json, write_error
from prism_lightning.provenance import Manifest

FORMAT_VERSION = 1
# Settings that must agree for shards to be reused or scored together.
IDENTITY_KEYS = ("format", "split", "model", "base_model", "adapter_sha256", "dataset_fingerprint", "projection",
                 "preconditioner", "damping", "curvature_sha256", "normalize", "dtype", "shard_size", "rows")


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


def record_path(folder: str | Path, shard: int) -> Path:
    return Path(folder) / f"shard-{shard:05d}.json"


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse NaN/Inf in any float tensor of a shard, naming the rows (``index``) that carry them."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t.reshape(t.shape[0], -1))).any(dim=1).nonzero().flatten()
            rows = tensors["index"][bad].tolist() if "index" in tensors else bad.tolist()
            raise NonFiniteError(f"{where}: {name!r} is NaN or Inf for rows {rows[:10]}"
                                 f"{' ...' if len(rows) > 10 else ''} ({len(rows)} rows); a gradient or loss "
                                 "overflowed: extract in float32 (trainer.precision: 32-true) or check these rows")


def write_shard(folder: str | Path, shard: int, tensors: dict[str, torch.Tensor]) -> Path:
    """Save one shard and then its record (both atomic); refuses NaN/Inf values."""
    path = shard_path(folder, shard)
    check_finite(tensors, f"{path}")
    with atomic_file(path) as tmp:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        except SafetensorError as err:  # safetensors reports a full disk or an unwritable file as its own error
            raise write_error(path, str(err)) from err
    index = tensors["index"]
    record = {"file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size,
              "rows": int(index.numel()), "first": int(index[0]), "last": int(index[-1])}
    atomic_write_text(record_path(folder, shard), json.dumps(record))
    return path


def read_manifest(folder: str | Path) -> Manifest | None:
    return Manifest.read(Path(folder) / "manifest.json")


def check_settings(folder: str | Path, settings: dict) -> None:
    """Refuse a store whose manifest disagrees with ``settings`` on ``IDENTITY_KEYS``, naming each difference."""
    found = read_manifest(folder)
    if found is not None:
        found.check(settings, IDENTITY_KEYS, error=StoreMismatchError,
                    fix="use another output_dir, or delete the store (or pass --force to the pipeline) to recompute it")


def complete_shards(folder: str | Path, n_shards: int) -> set[int]:
    """Shards whose file and record are on disk and agree in size (a shard without its record is redone)."""
    done = set()
    for j in range(n_shards):
        path, rec = shard_path(folder, j), record_path(folder, j)
        if path.exists() and rec.exists() and (read_json(rec) or {}).get("bytes") == path.stat().st_size:
            done.add(j)
    return done


def orphan_shards(folder: str | Path) -> list[Path]:
    """Shard files in a folder that has no manifest: nothing proves what they were made from."""
    folder = Path(folder)
    if (folder / "manifest.json").exists():
        return []
    return sorted(folder.glob("shard-*.safetensors"))


def shard_records(folder: str | Path, n_shards: int) -> list[dict]:
    """The records of shards 0..n-1, for the manifest."""
    return [read_json(record_path(folder, j)) for j in range(n_shards)]


def mark_complete(folder: str | Path, settings: dict, n_shards: int) -> dict:
    """Write the manifest of a store whose ``n_shards`` shards are all written: settings, shard records, complete."""
    manifest = dict(settings, complete=True, shards=shard_records(folder, n_shards))
    Manifest(Path(folder) / "manifest.json", manifest).write()
    return manifest


def _corrupt(path: Path, why: str) -> StoreCorruptError:
    return StoreCorruptError(f"{path} is {why}: delete it (and its .json record) and rerun the predict stage; "
                             "the other shards are kept")


class FeatureStore:
    """Lazy, memory-mapped reader of one store folder, rows in index order.

    Opening checks that the store is complete and that every shard the manifest lists exists with
    its recorded size; ``verify=True`` also checks each shard's sha256 (a full read). Reads refuse
    NaN/Inf values.
    """

    def __init__(self, folder: str | Path, require_complete: bool = True, verify: bool = False):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if self.manifest is None:
            shards = orphan_shards(self.folder)
            raise FileNotFoundError(f"{self.folder}: no manifest.json" + (
                f" but {len(shards)} shard files: nothing proves what they were made from; delete them and rerun "
                "the predict stage" if shards else "; run the predict stage first"))
        if require_complete and not self.manifest.get("complete"):
            raise StoreMismatchError(f"{self.folder}: the store is incomplete (an interrupted extraction?); "
                                     "rerun the predict stage to finish it")
        records = self.manifest.get("shards") or []
        if require_complete and not records:
            raise StoreMismatchError(f"{self.folder}: the manifest lists no shards (made by an older version?); "
                                     "delete the store and rerun the predict stage")
        self.records = records
        self.shards = [self.folder / r["file"] for r in records]
        for rec, path in zip(records, self.shards):
            if not path.exists():
                raise _corrupt(path, "missing")
            if path.stat().st_size != rec["bytes"]:
                raise _corrupt(path, f"{path.stat().st_size} bytes, not the {rec['bytes']} its manifest records "
                                     "(truncated or altered)")
        if verify:
            self.verify()

    def verify(self, shards: range | list[int] | None = None) -> None:
        """Recompute the sha256 of every shard (of ``shards``, default all) and compare it with the manifest."""
        for j in shards if shards is not None else range(len(self.shards)):
            if file_sha256(self.shards[j]) != self.records[j]["sha256"]:
                raise _corrupt(self.shards[j], "corrupt (its sha256 differs from the manifest)")

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def _read(self, rec: dict, path: Path, names: list[str] | None) -> dict[str, torch.Tensor]:
        try:
            with safe_open(str(path), framework="pt") as fh:
                keys = names or list(fh.keys())
                tensors = {k: fh.get_tensor(k) for k in keys}
                index = fh.get_tensor("index")
        except Exception as err:  # safetensors raises its own error types for a damaged file
            raise _corrupt(path, f"unreadable ({type(err).__name__}: {err})") from err
        if index.numel() != rec["rows"] or int(index[0]) != rec["first"] or int(index[-1]) != rec["last"]:
            raise _corrupt(path, "not the rows its manifest records")
        check_finite(dict(tensors, index=index), str(path))
        return tensors

    def iter_shards(self, names: list[str] | None = None,
                    shards: range | list[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """One dict of tensors per shard (of ``shards``, default all), in row order, read from the memory map."""
        for j in shards if shards is not None else range(len(self.shards)):
            yield self._read(self.records[j], self.shards[j], names)

    def rows(self, name: str, indices: list[int]) -> torch.Tensor:
        """Field ``name`` of the rows ``indices`` (in that order), reading only the shards that hold them."""
        wanted = torch.as_tensor(indices, dtype=torch.long)
        out: torch.Tensor | None = None
        for rec, path in zip(self.records, self.shards):
            inside = ((wanted >= rec["first"]) & (wanted <= rec["last"])).nonzero().flatten()
            if not len(inside):
                continue
            values = self._read(rec, path, [name])[name]
            if out is None:
                out = values.new_empty((len(wanted), *values.shape[1:]))
            out[inside] = values[wanted[inside] - rec["first"]]
        if out is None or len(wanted) and (wanted.min() < 0 or wanted.max() >= len(self)):
            raise IndexError(f"{self.folder}: rows {indices[:5]}... are not all in this store of {len(self)} rows")
        return out

    def iter_chunks(self, names: list[str], rows: int,
                    shards: range | list[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Chunks of at most ``rows`` rows of each shard (of ``shards``; memory bounded by ``rows x k``), in row
        order."""
        for shard in self.iter_shards(names, shards):
            n = shard[names[0]].shape[0]
            for s in range(0, n, rows):
                yield {k: v[s: s + rows] for k, v in shard.items()}

    def load(self, name: str) -> torch.Tensor:
        """One field of every row, concatenated (small fields, or small stores)."""
        return torch.cat([s[name] for s in self.iter_shards([name])])
