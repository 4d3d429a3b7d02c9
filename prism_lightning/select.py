"""The ``select`` stage: feature stores -> scores, subsets, weights, ranking metrics and plots.

Writes ``<selection_dir>/<mode>/{scores.jsonl, selected.jsonl, weights.jsonl, manifest.json}`` for
every mode, and, when the pool has a ground-truth column, ``ranking_metrics.json``, ``roc.png``
and ``score_distributions.png`` in ``<selection_dir>``. Every store is read once for all modes.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from prism_lightning.config import SelectionArgs
from prism_lightning.data.formats import PairRow, SFTRow, rows_digest
from prism_lightning.errors import NonFiniteError, StoreMismatchError
from prism_lightning.eval.plots import plot_roc, plot_score_distributions
from prism_lightning.eval.ranking import ranking_report
from prism_lightning.influence.scoring import (
    GRADIENT_MODES,
    MODES,
    Inputs,
    checkpoint_scores,
    combine,
    direction_matrix,
    preference_weights,
    reduce_groups,
)
from prism_lightning.influence.selection import budget, choose, rank_order
from prism_lightning.io import atomic_write_text, json_digest
from prism_lightning.store.feature_store import FeatureStore

# Manifest keys a store must share with the settings being scored (and pool with target stores).
SCORING_KEYS = ("model", "projection", "normalize", "dim")


def parse_modes(modes: str | list[str]) -> list[str]:
    """``"prism,less"`` or a list -> validated list of modes."""
    out = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if m.strip()]
    bad = [m for m in out if m not in MODES]
    if bad or not out:
        raise ValueError(f"unknown modes {bad or modes!r}; choose from {', '.join(MODES)}")
    return out


def _stores(features_dir: Path, epochs: list[int] | None, need_target: bool, verify: bool) -> list[tuple]:
    """(epoch, pool store, target store or None) per complete checkpoint, by epoch (hashes checked if ``verify``)."""
    found = []
    for folder in sorted(features_dir.glob("epoch-*"), key=lambda p: int(p.name.split("-")[1])):
        epoch = int(folder.name.split("-")[1])
        if epochs is not None and epoch not in epochs:
            continue
        pool = FeatureStore(folder / "pool", verify=verify)
        target = FeatureStore(folder / "target", verify=verify) if need_target else None
        found.append((epoch, pool, target))
    if not found:
        raise FileNotFoundError(f"{features_dir}: no feature stores (epoch-N/pool); run the predict stage first")
    return found


def _check(store: FeatureStore, expected: dict, what: str, split: str, epoch: int) -> None:
    """Refuse a store made with other settings, from other data or at another warmup checkpoint."""
    m = store.manifest
    diffs = [f"{k}: store has {m.get(k)!r}, scoring with {expected[k]!r}"
             for k in SCORING_KEYS if k in expected and m.get(k) != expected[k]]
    if diffs:
        raise StoreMismatchError(f"{store.folder} ({what}) was built with other settings: {'; '.join(diffs)}. "
                                 "Re-extract features with the current model/projection or score with the store's.")
    want = expected.get("dataset_fingerprint", {}).get(split)
    if want is not None and m.get("dataset_fingerprint") != want:
        raise StoreMismatchError(f"{store.folder} was extracted from other {split} rows than data.{split} now holds "
                                 "(token fingerprint differs: other rows, tokenizer or max_length); rerun the "
                                 f"predict stage for this {split}, or point data.{split} at the file it was made from")
    want = expected.get("adapter_sha256", {}).get(epoch)
    if want is not None and m.get("adapter_sha256") != want:
        raise StoreMismatchError(f"{store.folder} was extracted at another warmup checkpoint (the adapter file of "
                                 f"epoch {epoch} has changed since); rerun the predict stage")


def compute_scores(features_dir: str | Path, modes: list[str], args: SelectionArgs, pool: list[SFTRow],
                   targets: list[PairRow], expected: dict | None = None) -> tuple[dict, dict, list[dict]]:
    """Scores per mode [n] (float64), pi per target pair per epoch, and the stores' manifests."""
    grad_modes = [m for m in modes if m in GRADIENT_MODES]
    stores = _stores(Path(features_dir), args.epochs, need_target=bool(grad_modes), verify=args.verify)
    per_epoch, lrs, losses, weights, manifests = [], [], [], {}, []
    subtasks = [t.subtask for t in targets]
    need_loss = any(MODES[m].needs_loss for m in modes)
    for epoch, pstore, tstore in stores:
        if len(pstore) != len(pool):
            raise StoreMismatchError(f"{pstore.folder}: {len(pstore)} rows but the pool has {len(pool)}; the "
                                     "features were extracted for another pool")
        _check(pstore, expected or {}, "pool", "pool", epoch)
        lrs.append(float(pstore.manifest["lr_mean"]))
        manifests.append(pstore.manifest)
        if need_loss:
            losses.append(pstore.load("loss").double())
        if not grad_modes:
            continue
        if len(tstore) != len(targets):
            raise StoreMismatchError(f"{tstore.folder}: {len(tstore)} pairs but the target set has {len(targets)}")
        _check(tstore, {k: pstore.manifest[k] for k in SCORING_KEYS}, "target vs pool", "target", epoch)
        _check(tstore, expected or {}, "target", "target", epoch)
        manifests.append(tstore.manifest)
        pi = preference_weights(tstore.load("lbar_chosen").double(), tstore.load("lbar_rejected").double())
        weights[f"epoch-{epoch}"] = pi
        matrix, keys = direction_matrix(grad_modes, tstore.load("chosen"), tstore.load("rejected"), pi,
                                        subtasks, args.per_subtask_direction)
        chunks = (c["features"] for c in pstore.iter_chunks(["features"], args.chunk_rows))
        per_epoch.append(checkpoint_scores(chunks, matrix, keys))
    scores = reduce_groups(combine(per_epoch, lrs), keys, grad_modes) if grad_modes else {}
    inputs = Inputs(rows=len(pool), seed=args.seed, lrs=lrs, losses=losses)
    scores |= {m: MODES[m].scores(inputs) for m in modes if MODES[m].scores is not None}
    for mode in modes:
        bad = (~torch.isfinite(scores[mode])).nonzero().flatten().tolist()
        if bad:
            raise NonFiniteError(f"{features_dir}: mode {mode!r} gives NaN or Inf scores for pool rows "
                                 f"{[pool[i].id for i in bad[:10]]} ({len(bad)} rows); the stores are finite, so "
                                 "a dot product overflowed: use float32 stores (store_dtype: float32)")
    return {m: scores[m] for m in modes}, weights, manifests


def _row_record(row: SFTRow) -> dict:
    rec = {"id": row.id}
    if isinstance(row.prompt, list):
        rec["messages"] = row.prompt + [{"role": "assistant", "content": row.completion}]
    else:
        rec.update(prompt=row.prompt, completion=row.completion)
    return rec | {"subtask": row.subtask} | row.extra


def _jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def run_selection(features_dir: str | Path, selection_dir: str | Path, modes: str | list[str], args: SelectionArgs,
                  pool: list[SFTRow], targets: list[PairRow], expected: dict | None = None,
                  force: bool = False) -> dict:
    """Score, select and write every output file; returns ``{mode: summary}`` (+ ranking metrics)."""
    modes = parse_modes(modes)
    out = Path(selection_dir)
    ids = [r.id for r in pool]
    count = budget(len(pool), args.fraction, args.k)  # fail on a bad budget before reading stores
    scores, weights, manifests = compute_scores(features_dir, modes, args, pool, targets, expected)
    stores = [{"folder": m.get("adapter_path"), "split": m["split"], "epoch": m["epoch"],
               "adapter_sha256": m["adapter_sha256"], "manifest_sha256": json_digest(m)} for m in manifests]
    summary: dict = {}
    quota = [r.subtask for r in pool] if args.per_subtask_quota else None
    # what the selection is made of (not how it was computed: verify, plots and chunk_rows change no result)
    selection = {k: v for k, v in asdict(args).items() if k not in ("verify", "plots", "chunk_rows")}
    data = {"pool_rows": len(pool), "targets": len(targets), "pool_sha256": rows_digest(pool),
            "targets_sha256": rows_digest(targets)}
    for mode in modes:
        settings = {"mode": mode, "selection": selection, "stores": stores} | data
        mdir = out / mode
        old = mdir / "manifest.json"
        if old.exists() and not force:
            prev = json.loads(old.read_text())
            if {k: prev.get(k) for k in settings} != settings:
                raise StoreMismatchError(f"{mdir} holds a selection made with other settings; use another "
                                         "output_dir or --force to replace it")
        keep = choose(scores[mode], ids, args.task, args.fraction, args.k, quota)
        order = rank_order(scores[mode], ids)
        rank = [0] * len(ids)
        for r, i in enumerate(order, start=1):
            rank[i] = r
        _jsonl(mdir / "scores.jsonl", [{"id": ids[i], "score": float(scores[mode][i]), "rank": rank[i],
                                         "selected": bool(keep[i])} for i in range(len(ids))])
        _jsonl(mdir / "selected.jsonl", [_row_record(pool[i]) for i in range(len(ids)) if keep[i]])
        _jsonl(mdir / "weights.jsonl", [{"id": t.id, "subtask": t.subtask,
                                          "pi": {e: float(w[j]) for e, w in weights.items()}}
                                         for j, t in enumerate(targets)])
        atomic_write_text(old, json.dumps(dict(settings, selected_rows=int(keep.sum()), budget=count), indent=2))
        summary[mode] = {"selected_rows": int(keep.sum()), "dir": str(mdir)}
    labels = [r.extra.get(args.label) for r in pool] if args.label else []
    harmful = torch.tensor([bool(v) for v in labels]) if labels and None not in labels else None
    if harmful is not None and harmful.any():  # ranking metrics need ground truth with some harmful rows
        frac = args.fraction if args.fraction is not None else args.k / len(pool)
        report = ranking_report(scores, harmful, [r.subtask for r in pool], frac)
        atomic_write_text(out / "ranking_metrics.json", json.dumps(report, indent=2))
        summary["ranking_metrics"] = report
        if args.plots:
            plot_roc(scores, harmful, out / "roc.png")
            plot_score_distributions(scores, harmful, out / "score_distributions.png")
    return summary
