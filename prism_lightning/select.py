"""The select stage: feature stores -> scores, subsets, weights, explanations, ranking metrics.

One code path for the ``select`` command, the pipeline and a fine-tune's data module (``data.selection``):
``run_selection``. For every mode it writes ``<selection_dir>/<mode>/{scores.jsonl, selected.jsonl,
weights.jsonl, manifest.json}`` and, for a gradient mode, ``explain.jsonl`` (the ``explain`` highest- and
lowest-ranked rows with the target pairs behind their scores, an exact split: ``explain_scores``); with
``summaries`` and a ground-truth column also ``ranking_metrics.json``, ``roc.png`` and
``score_distributions.png`` in ``<selection_dir>``. Every store is read once for all modes, and every
mode's folder is replaced only once all of them are complete.

With several processes (``Ranks``: DDP/FSDP ranks, or ``torchrun``) each one scores a contiguous block of
the pool stores' shards; the blocks are gathered exactly (copied, not reduced: a row's score is the same
float64 whichever process computes it) and rank 0 ranks, chooses and writes. What the features were made
with (model, projection, preconditioner, damping, data files) is read from the stores' manifests; a
setting given explicitly is checked against them.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from prism_lightning.config import (
    Columns,
    DataSelection,
    SelectArgs,
    SelectionArgs,
    TargetCheckpoint,
    as_source,
    refuse,
    unique_modes,
)
from prism_lightning.data.formats import PairRow, PoolIndex, SFTRow, load_pairs, rows_digest
from prism_lightning.errors import NonFiniteError, StoreMismatchError
from prism_lightning.eval.plots import plot_roc, plot_score_distributions
from prism_lightning.eval.ranking import ranking_report
from prism_lightning.influence.projection import projection_identity
from prism_lightning.influence.scoring import (
    GRADIENT_MODES,
    MODES,
    Inputs,
    checkpoint_scores,
    contributions,
    direction_matrix,
    keep_winning_group,
    preference_weights,
    reduce_groups,
)
from prism_lightning.influence.selection import budget, choose, rank_order, ranks
from prism_lightning.io import atomic_file, atomic_folder, atomic_write_text, file_sha256, json_digest, run_lock
from prism_lightning.provenance import Manifest
from prism_lightning.ranks import Ranks, blocks, join_launched_group
from prism_lightning.store.feature_store import FeatureStore

if TYPE_CHECKING:
    from prism_lightning.context import StageContext

# What every store scored together must share (pool with target stores: the first four).
SCORING_KEYS = ("model", "base_model", "projection", "normalize", "dim")
POOL_KEYS = (*SCORING_KEYS, "preconditioner", "damping", "source_sha256", "tokenization", "shard_size", "rows")
# Selection settings that change no result (how it is computed, what else is written).
NOT_IDENTITY = ("verify", "plots", "chunk_rows", "explain", "explain_pairs")
REDO = "rerun the predict stage (the pipeline redoes it with --force)"


# ----- stores ----------------------------------------------------------------------------------------------
def feature_stores(features_dir: str | Path, epochs: list[int] | None, need_target: bool,
                   target_checkpoint: TargetCheckpoint = "each") -> list[tuple]:
    """(epoch, pool store, target store or None) per checkpoint folder ``epoch-N``, by N. With
    ``target_checkpoint="last"`` every entry holds the last checkpoint's target store (the only one read)."""
    features_dir = Path(features_dir)
    folders = sorted((p for p in features_dir.glob("epoch-*") if p.name.split("-")[1].isdigit()),
                     key=lambda p: int(p.name.split("-")[1]))
    chosen = [f for f in folders if epochs is None or int(f.name.split("-")[1]) in epochs]
    read = chosen[-1:] if target_checkpoint == "last" else chosen
    lacking = [f.name for f in read if need_target and not (f / "target" / "manifest.json").exists()]
    if lacking:
        have = [f.name for f in folders if (f / "target" / "manifest.json").exists()]
        raise FileNotFoundError(
            f"{features_dir}: no target store at {', '.join(lacking)} (target stores at: {', '.join(have) or 'none'}); "
            "extract the target side there (features target_checkpoint: each), or score every checkpoint against "
            "the last one's with selection.target_checkpoint: last and selection.epochs ending at a checkpoint "
            "that has one")
    last = FeatureStore(read[0] / "target") if need_target and read and target_checkpoint == "last" else None
    found = []
    for folder in chosen:
        target = None if not need_target else last if last is not None else FeatureStore(folder / "target")
        found.append((int(folder.name.split("-")[1]), FeatureStore(folder / "pool"), target))
    missing = sorted(set(epochs or []) - {e for e, _, _ in found})
    if missing:
        have = sorted(int(p.name.split("-")[1]) for p in folders)
        raise FileNotFoundError(f"{features_dir}: no stores for selection.epochs {missing} (it holds epochs {have}); "
                                "choose among those or extract features at those checkpoints")
    if not found:
        raise FileNotFoundError(f"{features_dir}: no feature stores (epoch-N/pool); run the predict stage first or "
                                "fix the features folder")
    return found


def stores_settings(stores: list[tuple]) -> dict:
    """What the features were made with, from the first pool store (all of them must agree)."""
    first = stores[0][1].manifest
    return {k: first.get(k) for k in (*POOL_KEYS, "preconditioner", "source", "columns")}


def explicit_settings(model: str | None = None, projection=None, preconditioner: str | None = None,
                      damping: float | None = None) -> dict:
    """The settings a user gave explicitly, as the stores record them (None: not given)."""
    out = {"model": model, "projection": projection_identity(projection) if projection is not None else None,
           "preconditioner": preconditioner, "damping": damping}
    return {k: v for k, v in out.items() if v is not None}


def check_stores(stores: list[tuple], pool_digest: str, target_digest: str | None, explicit: dict | None = None,
                 target_rows: int | None = None) -> None:
    """Refuse stores that disagree with each other, with the pool and targets given, with explicit settings, or
    whose warmup adapter has changed since they were extracted (every check through ``Manifest.check``)."""
    first = stores[0][1].manifest
    for _, pool, target in stores:
        m = pool.manifest
        m.check(explicit or {}, fix="drop the setting to score with the stores' own, or extract features with it",
                error=StoreMismatchError)
        m.check(first.data, POOL_KEYS, what=f"{pool.folder} (vs {stores[0][1].folder})", error=StoreMismatchError,
                fix=f"every checkpoint's pool store must be made alike; {REDO}")
        m.check({"source_sha256": pool_digest}, error=StoreMismatchError,
                fix="these pool rows are not the ones the features were extracted from: point the pool setting at "
                    f"that file, or {REDO} for this pool")
        check_adapter(m, pool.folder)
        if target is None:
            continue
        t = target.manifest
        t.check(m.data, SCORING_KEYS, what=f"{target.folder} (vs {pool.folder})",
                error=StoreMismatchError, fix=f"the target and pool stores must be made alike; {REDO}")
        same = next(p for _, p, _ in stores if p.folder.parent == target.folder.parent)  # its own checkpoint's
        t.check(same.manifest.data, ("adapter_sha256", "epoch"), what=f"{target.folder} (vs {same.folder})",
                error=StoreMismatchError, fix=f"the target store must be extracted at its folder's checkpoint; {REDO}")
        t.check({"source_sha256": target_digest}, error=StoreMismatchError,
                fix="these target pairs are not the ones the features were extracted from: point the target "
                    f"setting at that file, or {REDO} for these pairs")
        if target_rows is not None and len(target) != target_rows:
            raise StoreMismatchError(f"{target.folder}: {len(target)} pairs but the target set has {target_rows}; "
                                     f"{REDO}")


def check_adapter(manifest: Manifest, folder: Path) -> None:
    """The warmup adapter a store was extracted at must still be that file (when it is still on disk)."""
    adapter = Path(manifest.get("adapter_path") or "") / "adapter_model.safetensors"
    if manifest.get("adapter_path") and adapter.exists() and file_sha256(adapter) != manifest.get("adapter_sha256"):
        raise StoreMismatchError(f"{folder}: extracted at another warmup checkpoint than {adapter} now holds (its "
                                 f"sha256 differs from the store's record); {REDO}")


def target_view(targets: list[PairRow], subtask: str | None) -> list[int]:
    """Indices of the target pairs that make the direction: all, or those of ``subtask``."""
    if subtask is None:
        return list(range(len(targets)))
    keep = [j for j, t in enumerate(targets) if t.subtask == subtask]
    if not keep:
        refuse("selection", [f"subtask={subtask!r} has no target pair; the targets' subtasks are "
                             f"{sorted({t.subtask for t in targets})}"])
    return keep


# ----- scores ----------------------------------------------------------------------------------------------
def compute_scores(stores: list[tuple] | str | Path, modes: list[str], args: SelectionArgs, rows: int,
                   targets: list[PairRow], ranks: Ranks | None = None,
                   pi: torch.Tensor | None = None) -> tuple[dict, dict]:
    """Scores per mode [rows] (float64) on every rank, and pi per target pair per epoch.

    ``stores``: ``feature_stores``' list, or the features folder. Each rank scores its block of the pool shards
    (``ranks.blocks``); ``pi`` (one weight per target pair of the view) replaces the stores' preference weights
    at every checkpoint (re-selection at the current model).
    """
    ranks = ranks or Ranks()
    grad_modes = [m for m in modes if m in GRADIENT_MODES]
    if isinstance(stores, (str, Path)):
        stores = feature_stores(stores, args.epochs, bool(grad_modes), args.target_checkpoint)
    view = torch.tensor(target_view(targets, args.subtask))
    subtasks = [targets[j].subtask for j in view.tolist()]
    records = stores[0][1].records
    mine = blocks([r["rows"] for r in records], ranks.world)
    shard_ids = mine[ranks.rank]
    counts = [sum(records[j]["rows"] for j in b) for b in mine]
    local = counts[ranks.rank]
    total, loss, weights, keys = None, None, {}, []
    need_loss = any(MODES[m].needs_loss for m in modes)
    for epoch, pstore, tstore in stores:  # s = sum_i lr_i s_i, accumulated checkpoint by checkpoint
        if len(pstore) != rows:
            raise StoreMismatchError(f"{pstore.folder}: {len(pstore)} rows but the pool has {rows}; the features "
                                     f"were extracted for another pool; {REDO}")
        lr = float(pstore.manifest["lr_mean"])
        if need_loss:
            part = torch.cat([s["loss"] for s in pstore.iter_shards(["loss"], shard_ids)] or
                             [torch.zeros(0)]).double().mul_(lr)
            loss = part if loss is None else loss.add_(part)
        if not grad_modes:
            continue
        p = pi if pi is not None else preference_weights(tstore.load("lbar_chosen").double()[view],
                                                         tstore.load("lbar_rejected").double()[view])
        weights[f"epoch-{epoch}"] = p
        # every gradient mode's columns, whichever are asked for: a mode's float64 scores are then the same bits
        # whatever other modes are scored with it (a BLAS product's rounding depends on the matrix's width)
        matrix, keys = direction_matrix(GRADIENT_MODES, tstore.load("chosen")[view], tstore.load("rejected")[view], p,
                                        subtasks, args.per_subtask_direction)
        chunks = (c["features"] for c in pstore.iter_chunks(["features"], args.chunk_rows, shard_ids))
        dots = checkpoint_scores(chunks, matrix, keys, local).mul_(lr)
        total = dots if total is None else total.add_(dots)
        del dots
    scores = reduce_groups(total, keys, grad_modes) if grad_modes else {}
    del total
    if need_loss:
        scores["loss"] = -loss
    scores = {m: ranks.gather_rows(s, counts) for m, s in scores.items()}
    inputs = Inputs(rows=rows, seed=args.seed, loss=None)
    scores |= {m: MODES[m].scores(inputs) for m in modes if MODES[m].scores is not None and not MODES[m].needs_loss}
    for mode in modes:
        bad = (~torch.isfinite(scores[mode])).nonzero().flatten().tolist()
        if bad:
            raise NonFiniteError(f"{stores[0][1].folder.parent.parent}: mode {mode!r} gives NaN or Inf scores for "
                                 f"pool rows (0-based) {bad[:10]} ({len(bad)} rows); the stores are finite, so a dot "
                                 "product overflowed: use float32 stores (store_dtype: float32)")
    return {m: scores[m] for m in modes}, weights


# ----- selection -------------------------------------------------------------------------------------------
def selection_identity(mode: str, args: SelectionArgs, stores: list[tuple], pool: PoolIndex,
                       targets: list[PairRow]) -> dict:
    """What a mode's selection is made of (not how it was computed); its manifest records it."""
    records = [{"folder": s.manifest.get("adapter_path"), "split": s.manifest["split"],
                "epoch": s.manifest["epoch"], "adapter_sha256": s.manifest["adapter_sha256"],
                "manifest_sha256": json_digest(s.manifest.data)}
               for _, p, t in stores for s in ((p, t) if t is not None and mode in GRADIENT_MODES else (p,))]
    selection = {f.name: getattr(args, f.name) for f in fields(SelectionArgs) if f.name not in NOT_IDENTITY}
    return {"mode": mode, "selection": selection, "stores": records, "pool_rows": pool.rows,
            "targets": len(targets), "pool_sha256": pool.digest, "targets_sha256": rows_digest(targets)}


FIX_OTHER = "use another output folder, or force to replace it"


def parse_modes(modes: str | list[str]) -> list[str]:
    """``"prism,less"`` or a list -> the modes, each known and named once."""
    out = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if m.strip()]
    bad = [m for m in out if m not in MODES]
    refuse("modes", [bad and f"unknown modes {bad}; choose from {', '.join(MODES)}", *unique_modes(out)])
    return out


def run_selection(features_dir: str | Path, selection_dir: str | Path, modes: str | list[str],
                  args: SelectionArgs, pool: PoolIndex, targets: list[PairRow], explicit: dict | None = None,
                  force: bool = False, ranks: Ranks | None = None, pi: torch.Tensor | None = None,
                  summaries: bool = True) -> dict:
    """Score, select and write every output file; returns ``{mode: summary}`` (+ ``ranking_metrics`` on rank 0, and
    ``seconds`` of the phases: ``check`` the stores, ``score`` (hash, score, choose) and ``write``) on every rank.

    Memory: the stores are streamed (``chunk_rows`` rows at a time); per pool row only the scores, ranks and
    masks (a few numbers per mode) and the subtask code and label are held. The outputs are written row by
    row in one more pass over the pool (rank 0).
    """
    ranks, modes = ranks or Ranks(), parse_modes(modes)
    out = Path(selection_dir)
    clock = [time.perf_counter()]
    count = budget(pool.rows, args.fraction, args.k)  # fail on a bad budget before reading stores
    if args.task == "repair" and count >= pool.rows:
        refuse("selection", [f"a repair removing {count} of {pool.rows} rows keeps none; lower fraction or k"])
    grad = any(m in GRADIENT_MODES for m in modes)
    stores = feature_stores(features_dir, args.epochs, grad, args.target_checkpoint)
    check_stores(stores, pool.digest, rows_digest(targets) if grad else None, explicit,
                 len(targets) if grad else None)
    identity = {m: selection_identity(m, args, stores, pool, targets) for m in modes}
    for mode in modes:
        old = Manifest.read(out / mode / "manifest.json")
        if old is not None and not force:
            old.check(identity[mode], what=str(out / mode), fix=FIX_OTHER, error=StoreMismatchError)
    clock.append(time.perf_counter())
    if args.verify:  # each rank hashes its block of the pool shards; rank 0 the small target stores
        mine = blocks([r["rows"] for r in stores[0][1].records], ranks.world)[ranks.rank]
        for _, pstore, _ in stores:
            pstore.verify(mine)
        if ranks.is_zero:
            for tstore in {id(t): t for _, _, t in stores if t is not None}.values():  # "last": one store
                tstore.verify()
    scores, weights = compute_scores(stores, modes, args, pool.rows, targets, ranks, pi)
    quota = pool.subtasks if args.per_subtask_quota else None
    keep = {m: choose(scores[m], args.task, args.fraction, args.k, quota) for m in modes}
    clock.append(time.perf_counter())
    summary: dict = {m: {"selected_rows": int(keep[m].sum()), "dir": str(out / m), "keep": keep[m]} for m in modes}
    if ranks.is_zero:
        write_selection(out, modes, args, pool, targets, scores, keep, weights, identity, count, stores, pi)
        harmful = pool.labels if args.label else None
        if summaries and harmful is not None and harmful.any():  # ranking metrics need some harmful rows
            frac = args.fraction if args.fraction is not None else args.k / pool.rows
            report = ranking_report(scores, harmful, pool.subtasks, pool.subtask_names, frac)
            atomic_write_text(out / "ranking_metrics.json", json.dumps(report, indent=2))
            summary["ranking_metrics"] = report
            if args.plots:
                plot_roc(scores, harmful, out / "roc.png")
                plot_score_distributions(scores, harmful, out / "score_distributions.png")
    ranks.barrier()
    clock.append(time.perf_counter())
    summary["seconds"] = dict(zip(("check", "score", "write"), (b - a for a, b in zip(clock, clock[1:]))))
    return summary


def write_selection(out: Path, modes: list[str], args: SelectionArgs, pool: PoolIndex, targets: list[PairRow],
                    scores: dict, keep: dict, weights: dict, identity: dict, count: int, stores: list[tuple],
                    pi: torch.Tensor | None) -> None:
    """Every mode's folder, filled in temporaries and put in place only once all are complete."""
    order = {m: rank_order(scores[m]) for m in modes}
    rank = {m: ranks(order[m]) for m in modes}
    explained = {m: ends(order[m], args.explain) for m in modes if m in GRADIENT_MODES and args.explain}
    parts = explain_scores(stores, explained, args, targets, pi) if explained else {}
    for mode, rows in explained.items():  # the split is exact: refuse to write one that is not
        check_split(parts[mode], scores[mode][rows], mode)
    view = target_view(targets, args.subtask)
    weights_text = "".join(json.dumps({"id": targets[j].id, "subtask": targets[j].subtask,
                                       "pi": {e: float(w[i]) for e, w in weights.items()}}) + "\n"
                           for i, j in enumerate(view))
    with ExitStack() as stack:
        folders = {m: stack.enter_context(atomic_folder(out / m)) for m in modes}
        texts = _write_rows(folders, modes, pool, scores, rank, keep, wanted={i for r in explained.values() for i in r})
        for mode, rows in explained.items():
            _write_explain(folders[mode] / "explain.jsonl", rows, parts[mode], scores[mode], rank[mode], texts,
                           [targets[j] for j in view], pool, args.explain_pairs)
        for mode in modes:
            (folders[mode] / "weights.jsonl").write_text(weights_text)
            files = {name: file_sha256(folders[mode] / name) for name in ("scores.jsonl", "selected.jsonl")}
            Manifest(folders[mode] / "manifest.json", dict(identity[mode], selected_rows=int(keep[mode].sum()),
                                                           budget=count, files=files)).write()


def _row_record(row: SFTRow) -> dict:
    rec = {"id": row.id}
    if isinstance(row.prompt, list):
        rec["messages"] = row.prompt + [{"role": "assistant", "content": row.completion}]
    else:
        rec.update(prompt=row.prompt, completion=row.completion)
    return rec | {"subtask": row.subtask} | row.extra


def _write_rows(folders: dict[str, Path], modes: list[str], pool: PoolIndex, scores: dict, rank: dict, keep: dict,
                wanted: set[int] | None = None, block: int = 65536) -> dict[int, SFTRow]:
    """``scores.jsonl`` and ``selected.jsonl`` of every mode, row by row in one pass over the pool; returns the
    rows ``wanted`` (by index) for the explanations. Per-row numbers become Python values ``block`` rows at a
    time, so memory stays bounded."""
    texts: dict[int, SFTRow] = {}
    with ExitStack() as stack:
        files = {(m, name): stack.enter_context(open(folders[m] / f"{name}.jsonl", "w"))
                 for m in modes for name in ("scores", "selected")}
        values: dict = {}
        for i, row in enumerate(pool.iter_rows()):
            if wanted and i in wanted:
                texts[i] = row
            if i % block == 0:
                values = {m: [t[i: i + block].tolist() for t in (scores[m], rank[m], keep[m])] for m in modes}
            record = None
            for mode in modes:
                score, r, kept = (v[i % block] for v in values[mode])
                files[mode, "scores"].write(json.dumps({"id": row.id, "score": score, "rank": r, "selected": kept})
                                            + "\n")
                if kept:
                    record = record or json.dumps(_row_record(row))
                    files[mode, "selected"].write(record + "\n")
    return texts


# ----- a selection as training rows (data.selection) -------------------------------------------------------
def selection_folder(sel: DataSelection) -> Path:
    return Path(sel.output_dir) if sel.output_dir else Path(sel.features).parent / "selection"


def read_selected(folder: Path, pool: PoolIndex, manifest: Manifest) -> list[int]:
    """The selected row indices of a finished selection, after checking its files against its manifest."""
    path = folder / "scores.jsonl"
    for name, digest in (manifest.get("files") or {}).items():
        if not (folder / name).exists() or file_sha256(folder / name) != digest:
            raise StoreMismatchError(f"{folder / name} is missing or altered (its sha256 differs from "
                                     f"{folder / 'manifest.json'}); delete {folder} to recompute it")
    if not manifest.get("files"):
        raise StoreMismatchError(f"{folder / 'manifest.json'} records no file digests (an older selection); delete "
                                 f"{folder} to recompute it")
    rows = []
    with open(path) as fh:
        for i, (line, row) in enumerate(zip(fh, pool.iter_rows())):
            record = json.loads(line)
            if record["id"] != row.id:
                raise StoreMismatchError(f"{path}: line {i + 1} is row {record['id']!r}, the pool's row {i + 1} is "
                                         f"{row.id!r}; delete {folder} to recompute it")
            if record["selected"]:
                rows.append(i)
    return rows


def training_rows(sel: DataSelection, pool: PoolIndex, targets: list[PairRow], ranks: Ranks | None = None) -> list[int]:
    """The pool rows a fine-tune trains on, identical on every rank: a finished selection of the same identity
    is reused (rank 0 reads it), otherwise it is computed (shards split over the ranks) and written."""
    ranks = ranks or Ranks()
    out = selection_folder(sel)
    args = SelectionArgs(**{f.name: getattr(sel, f.name) for f in fields(SelectionArgs)})
    grad = sel.mode in GRADIENT_MODES
    stores = feature_stores(sel.features, args.epochs, grad, args.target_checkpoint)
    identity = selection_identity(sel.mode, args, stores, pool, targets)
    old = Manifest.read(out / sel.mode / "manifest.json")
    reuse = old is not None and not sel.force
    if reuse:
        old.check(identity, what=str(out / sel.mode), fix=FIX_OTHER, error=StoreMismatchError)
        check_stores(stores, pool.digest, rows_digest(targets) if grad else None, None, len(targets) if grad else None)
        rows = ranks.broadcast(read_selected(out / sel.mode, pool, old) if ranks.is_zero else None)
    else:
        summary = run_selection(sel.features, out, [sel.mode], args, pool, targets, force=sel.force, ranks=ranks,
                                summaries=False)
        rows = ranks.broadcast(summary[sel.mode]["keep"].nonzero().flatten().tolist() if ranks.is_zero else None)
    if not rows:
        raise StoreMismatchError(f"{out / sel.mode}: the selection is empty")
    return rows


# ----- the select command ----------------------------------------------------------------------------------
def select_command(cmd: SelectArgs) -> dict:
    """``python -m prism_lightning select``: the stores' settings, the pool and targets they were made from (or
    the ones given, checked), every mode scored and written. Runs on one process or under ``torchrun``; rank 0
    holds the output folder's lock from the start (a second run into it is refused before any work)."""
    created = join_launched_group()
    try:
        return _select(cmd)
    finally:
        if created:
            dist.destroy_process_group()


def _select(cmd: SelectArgs) -> dict:
    ranks = Ranks.current()
    out = Path(cmd.output_dir) if cmd.output_dir else Path(cmd.features).parent / "selection"
    with run_lock(out) if ranks.is_zero else nullcontext():
        grad = any(m in GRADIENT_MODES for m in cmd.modes)
        stores = feature_stores(cmd.features, cmd.selection.epochs, grad, cmd.selection.target_checkpoint)
        made = stores_settings(stores)
        cols = cmd.columns or Columns(**(made.get("columns") or {}))
        pool_source = cmd.pool or _recorded_source(made.get("source"), stores[0][1].folder, "pool")
        pool = PoolIndex.scan(as_source(pool_source), cols, cmd.selection.label)
        targets = []
        if grad:
            tmade = stores[0][2].manifest
            tcols = cmd.columns or Columns(**(tmade.get("columns") or {}))
            targets = load_pairs(as_source(cmd.target or _recorded_source(tmade.get("source"), stores[0][2].folder,
                                                                          "target")), tcols)
        explicit = explicit_settings(cmd.model, cmd.projection, cmd.pool_preconditioner, cmd.damping)
        summary = run_selection(cmd.features, out, list(cmd.modes), cmd.selection, pool, targets,
                                explicit=explicit, force=cmd.force, ranks=ranks)
    if ranks.is_zero:
        for mode in cmd.modes:
            print(f"{mode}: {summary[mode]['selected_rows']} rows -> {summary[mode]['dir']}/selected.jsonl")
    return summary


def _recorded_source(source, folder: Path, split: str):
    if source is None:
        raise FileNotFoundError(f"{folder}: the store does not record the {split} file it was made from (an older "
                                f"store); give --{split}")
    return source


# ----- explanations ----------------------------------------------------------------------------------------
def ends(order: torch.Tensor, k: int) -> list[int]:
    """Row indices of the ``k`` highest- and ``k`` lowest-ranked rows (each row once), by rank."""
    return order[:k].tolist() + order[max(k, len(order) - k):].tolist()


def explain_scores(stores: list[tuple], explained: dict[str, list[int]], args: SelectionArgs,
                   targets: list[PairRow], pi: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per mode: each explained row's score split over the target pairs of the view [rows, m] (float64).

    ``s(z) = sum_i lr_i <f_i(z), d_i>`` and every ``d_i`` is a sum of one term per pair, so the split is
    exact; for a per-subtask mode only the pairs of the row's winning subtask count. Reads the stores a
    second time, only the shards holding the explained rows.
    """
    view = torch.tensor(target_view(targets, args.subtask))
    subtasks = [targets[j].subtask for j in view.tolist()]
    union = sorted({i for rows in explained.values() for i in rows})
    where = {i: j for j, i in enumerate(union)}
    total = {m: torch.zeros(len(union), len(view), dtype=torch.float64) for m in explained}
    for _, pstore, tstore in stores:
        lr = float(pstore.manifest["lr_mean"])
        feats = pstore.rows("features", union)
        chosen, rejected = tstore.load("chosen")[view], tstore.load("rejected")[view]
        p = pi if pi is not None else preference_weights(tstore.load("lbar_chosen").double()[view],
                                                         tstore.load("lbar_rejected").double()[view])
        for mode in explained:
            total[mode] += lr * contributions(mode, feats, chosen, rejected, p, subtasks, args.per_subtask_direction)
    out = {}
    for mode, rows in explained.items():
        parts = keep_winning_group(total[mode], subtasks, args.per_subtask_direction, mode)
        out[mode] = parts[[where[i] for i in rows]]
    return out


def check_split(parts: torch.Tensor, scores: torch.Tensor, mode: str) -> None:
    """The per-pair parts must sum to the scores (they are the same sums in another order)."""
    gap = (parts.sum(1) - scores).abs().max()
    if len(scores) and gap > 1e-6 * max(1.0, float(scores.abs().max())):
        raise RuntimeError(f"mode {mode!r}: the per-pair split of the scores is off by {float(gap):.3g}; "
                           "please report this with the store manifests")


def _snippet(text, limit: int = 300) -> str:
    text = text if isinstance(text, str) else json.dumps(text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _write_explain(path: Path, rows: list[int], parts: torch.Tensor, scores: torch.Tensor, rank: torch.Tensor,
                   texts: dict[int, SFTRow], targets: list[PairRow], pool: PoolIndex, top: int) -> None:
    """``explain.jsonl``: per explained row, its text, score, rank and the pairs and subtasks behind the score.

    ``share`` is a part's contribution divided by the score (the shares of all pairs sum to 1).
    """
    n = len(scores)
    lines = []
    for j, i in enumerate(rows):
        row, score, part = texts[i], float(scores[i]), parts[j]
        by_subtask: dict[str, float] = {}
        for q, t in enumerate(targets):
            by_subtask[t.subtask] = by_subtask.get(t.subtask, 0.0) + float(part[q])
        strongest = part.abs().argsort(descending=True)[:top].tolist()

        def share(v: float, score: float = score) -> float:
            return v / score if score else float("nan")

        record = {"rank": int(rank[i]), "end": "top" if int(rank[i]) <= n // 2 else "bottom", "row": i,
                  **_row_record(row), "score": score,
                  "pairs": [{"id": targets[q].id, "subtask": targets[q].subtask, "contribution": float(part[q]),
                             "share": share(float(part[q])), "prompt": _snippet(targets[q].prompt),
                             "chosen": _snippet(targets[q].chosen), "rejected": _snippet(targets[q].rejected)}
                            for q in strongest],
                  "other_pairs": float(part.sum() - part[strongest].sum()),
                  "by_subtask": {k: {"contribution": v, "share": share(v)} for k, v in sorted(by_subtask.items())}}
        if pool.labels is not None:
            record["label"] = bool(pool.labels[i])
        lines.append(json.dumps(record) + "\n")
    with atomic_file(path) as tmp:
        tmp.write_text("".join(lines))


def explained_text(record: dict) -> tuple[str, str]:
    """``(prompt, answer)`` of an ``explain.jsonl`` record (plain or chat row, see ``_row_record``)."""
    messages = record.get("messages") or [{}]
    return (record.get("prompt", messages[0].get("content", "")),
            record.get("completion", messages[-1].get("content", "")))


def top_explained(selection_dir: str | Path, kind: str, mode: str = "prism", n: int = 10) -> list[dict]:
    """The ``n`` rows a person should look at first, from ``<mode>/explain.jsonl``: the most harmful (repair)
    or the top selected (forward), each with its strongest target pair; [] when there is no such file."""
    path = Path(selection_dir) / mode / "explain.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records.sort(key=lambda r: r["rank"], reverse=kind == "repair")
    out = []
    for r in records[:n]:
        prompt, text = explained_text(r)
        pair = r["pairs"][0] if r["pairs"] else {}
        out.append({"mode": mode, "rank": r["rank"], "id": r["id"], "subtask": r.get("subtask"),
                    "label": r.get("label"), "score": r["score"], "prompt": _snippet(prompt, 80),
                    "completion": _snippet(text, 80), "pair": pair.get("id"), "pair_subtask": pair.get("subtask"),
                    "pair_share": pair.get("share"), "pair_prompt": _snippet(pair.get("prompt", ""), 60)})
    return out



# ----- as a pipeline stage ---------------------------------------------------------------------------------
def stage_selection(ctx: StageContext) -> SelectionArgs:
    """The selection settings of an experiment and seed (the fine-tunes' ``data.selection`` share them)."""
    return SelectionArgs(task=ctx.exp.kind, fraction=ctx.exp.fraction, seed=ctx.seed,
                         target_checkpoint=ctx.args.target_checkpoint)


def identity(ctx: StageContext) -> dict:
    """The selection is made of the features, the modes and the selection settings."""
    return dict(ctx.identities["features"], modes=list(ctx.args.modes), selection=asdict(stage_selection(ctx)))


def run(ctx: StageContext) -> None:
    """Every mode of the experiment, scored on every rank's block of shards, written by rank 0."""
    args = stage_selection(ctx)
    dm = ctx.data_for()
    pool = PoolIndex.scan(as_source(ctx.exp.pool), dm.columns_of("pool"), args.label)
    targets = load_pairs(as_source(dm.target), dm.columns_of("target"))
    run_selection(ctx.root / "features", ctx.root / "selection", list(ctx.args.modes), args, pool, targets,
                  ranks=Ranks.current())


def collect(ctx: StageContext) -> dict:
    """The ranking metrics and the rows to look at, for the report."""
    path = ctx.root / "selection" / "ranking_metrics.json"
    mode = "prism" if "prism" in ctx.args.modes else ctx.args.modes[0]
    return {"ranking": json.loads(path.read_text()) if path.exists() else {},
            "explained": top_explained(ctx.root / "selection", ctx.exp.kind, mode)}


def main(args: list[str] | None = None) -> dict:
    """``python -m prism_lightning select``, its parser listing only what it uses (``config.SelectArgs``)."""
    from prism_lightning.cli import parse_settings

    return select_command(parse_settings(SelectArgs, args, "select", SelectArgs.__doc__))
