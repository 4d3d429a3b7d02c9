"""The ``select`` stage: feature stores -> scores, subsets, weights, ranking metrics and plots.

Writes ``<selection_dir>/<mode>/{scores.jsonl, selected.jsonl, weights.jsonl, manifest.json}`` for
every mode; ``<mode>/explain.jsonl`` for every gradient mode (the ``explain`` highest- and
lowest-ranked rows with the target pairs behind their scores, an exact split: ``explain_scores``);
and, when the pool has a ground-truth column, ``ranking_metrics.json``, ``roc.png`` and
``score_distributions.png`` in ``<selection_dir>``. Every store is read once for all modes.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch

from prism_lightning.config import SelectionArgs
from prism_lightning.data.formats import PairRow, PoolIndex, SFTRow, rows_digest
from prism_lightning.errors import NonFiniteError, StoreMismatchError
from prism_lightning.eval.plots import plot_roc, plot_score_distributions
from prism_lightning.eval.ranking import ranking_report
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
from prism_lightning.io import atomic_file, atomic_write_text, json_digest
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
    want = expected.get("source_sha256", {}).get(split)
    if want is not None and m.get("source_sha256") != want:
        raise StoreMismatchError(f"{store.folder} was extracted from other {split} rows than data.{split} now holds; "
                                 f"rerun the predict stage for this {split}, or point data.{split} at the file it "
                                 "was made from")
    want = expected.get("tokenization")
    if want and m.get("tokenization") != want:
        raise StoreMismatchError(f"{store.folder} was extracted with {m.get('tokenization')} and the data settings "
                                 f"now say {want}; rerun the predict stage or restore those settings")
    want = expected.get("adapter_sha256", {}).get(epoch)
    if want is not None and m.get("adapter_sha256") != want:
        raise StoreMismatchError(f"{store.folder} was extracted at another warmup checkpoint (the adapter file of "
                                 f"epoch {epoch} has changed since); rerun the predict stage")


def compute_scores(features_dir: str | Path, modes: list[str], args: SelectionArgs, rows: int,
                   targets: list[PairRow], expected: dict | None = None) -> tuple[dict, dict, list[dict]]:
    """Scores per mode [rows] (float64), pi per target pair per epoch, and the stores' manifests."""
    grad_modes = [m for m in modes if m in GRADIENT_MODES]
    stores = _stores(Path(features_dir), args.epochs, need_target=bool(grad_modes), verify=args.verify)
    total, loss, lrs, weights, manifests, keys = None, None, [], {}, [], []
    subtasks = [t.subtask for t in targets]
    need_loss = any(MODES[m].needs_loss for m in modes)
    for epoch, pstore, tstore in stores:  # s = sum_i lr_i s_i, accumulated checkpoint by checkpoint
        if len(pstore) != rows:
            raise StoreMismatchError(f"{pstore.folder}: {len(pstore)} rows but the pool has {rows}; the "
                                     "features were extracted for another pool")
        _check(pstore, expected or {}, "pool", "pool", epoch)
        lr = float(pstore.manifest["lr_mean"])
        lrs.append(lr)
        manifests.append(pstore.manifest)
        if need_loss:
            part = pstore.load("loss").double().mul_(lr)
            loss = part if loss is None else loss.add_(part)
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
        dots = checkpoint_scores(chunks, matrix, keys, rows).mul_(lr)
        total = dots if total is None else total.add_(dots)
        del dots
    scores = reduce_groups(total, keys, grad_modes) if grad_modes else {}
    del total
    inputs = Inputs(rows=rows, seed=args.seed, loss=loss)
    scores |= {m: MODES[m].scores(inputs) for m in modes if MODES[m].scores is not None}
    for mode in modes:
        bad = (~torch.isfinite(scores[mode])).nonzero().flatten().tolist()
        if bad:
            raise NonFiniteError(f"{features_dir}: mode {mode!r} gives NaN or Inf scores for pool rows (0-based) "
                                 f"{bad[:10]} ({len(bad)} rows); the stores are finite, so a dot product "
                                 "overflowed: use float32 stores (store_dtype: float32)")
    return {m: scores[m] for m in modes}, weights, manifests


def _row_record(row: SFTRow) -> dict:
    rec = {"id": row.id}
    if isinstance(row.prompt, list):
        rec["messages"] = row.prompt + [{"role": "assistant", "content": row.completion}]
    else:
        rec.update(prompt=row.prompt, completion=row.completion)
    return rec | {"subtask": row.subtask} | row.extra


def run_selection(features_dir: str | Path, selection_dir: str | Path, modes: str | list[str], args: SelectionArgs,
                  pool: PoolIndex, targets: list[PairRow], expected: dict | None = None,
                  force: bool = False) -> dict:
    """Score, select and write every output file; returns ``{mode: summary}`` (+ ranking metrics).

    Memory: the stores are streamed (``chunk_rows`` rows at a time); per pool row only the scores,
    ranks and masks (a few numbers per mode) and the subtask code and label are held. The outputs are
    written row by row in one more pass over the pool file.
    """
    modes = parse_modes(modes)
    out = Path(selection_dir)
    count = budget(pool.rows, args.fraction, args.k)  # fail on a bad budget before reading stores
    scores, weights, manifests = compute_scores(features_dir, modes, args, pool.rows, targets, expected)
    stores = [{"folder": m.get("adapter_path"), "split": m["split"], "epoch": m["epoch"],
               "adapter_sha256": m["adapter_sha256"], "manifest_sha256": json_digest(m)} for m in manifests]
    # what the selection is made of (not how it was computed: verify, plots and chunk_rows change no result)
    selection = {k: v for k, v in asdict(args).items()
                 if k not in ("verify", "plots", "chunk_rows", "explain", "explain_pairs")}
    data = {"pool_rows": pool.rows, "targets": len(targets), "pool_sha256": pool.digest,
            "targets_sha256": rows_digest(targets)}
    settings = {mode: {"mode": mode, "selection": selection, "stores": stores} | data for mode in modes}
    for mode in modes:
        old = out / mode / "manifest.json"
        if old.exists() and not force:
            prev = json.loads(old.read_text())
            if {k: prev.get(k) for k in settings[mode]} != settings[mode]:
                raise StoreMismatchError(f"{out / mode} holds a selection made with other settings; use another "
                                         "output_dir or --force to replace it")
    quota = pool.subtasks if args.per_subtask_quota else None
    keep = {m: choose(scores[m], args.task, args.fraction, args.k, quota) for m in modes}
    order = {m: rank_order(scores[m]) for m in modes}
    rank = {m: ranks(order[m]) for m in modes}
    explained = {m: ends(order[m], args.explain) for m in modes if m in GRADIENT_MODES and args.explain}
    parts = explain_scores(features_dir, explained, args, targets) if explained else {}
    for mode, rows in explained.items():  # the split is exact: refuse to write one that is not
        check_split(parts[mode], scores[mode][rows], mode)
    texts = _write_rows(out, modes, pool, scores, rank, keep, wanted={i for r in explained.values() for i in r})
    for mode, rows in explained.items():
        _write_explain(out / mode / "explain.jsonl", rows, parts[mode], scores[mode], rank[mode], texts, targets,
                       pool, args.explain_pairs)
    weights_text = "".join(json.dumps({"id": t.id, "subtask": t.subtask,
                                       "pi": {e: float(w[j]) for e, w in weights.items()}}) + "\n"
                           for j, t in enumerate(targets))
    summary: dict = {}
    for mode in modes:
        atomic_write_text(out / mode / "weights.jsonl", weights_text)
        selected = int(keep[mode].sum())
        atomic_write_text(out / mode / "manifest.json",
                          json.dumps(dict(settings[mode], selected_rows=selected, budget=count), indent=2))
        summary[mode] = {"selected_rows": selected, "dir": str(out / mode)}
    harmful = pool.labels if args.label else None
    if harmful is not None and harmful.any():  # ranking metrics need ground truth with some harmful rows
        frac = args.fraction if args.fraction is not None else args.k / pool.rows
        report = ranking_report(scores, harmful, pool.subtasks, pool.subtask_names, frac)
        atomic_write_text(out / "ranking_metrics.json", json.dumps(report, indent=2))
        summary["ranking_metrics"] = report
        if args.plots:
            plot_roc(scores, harmful, out / "roc.png")
            plot_score_distributions(scores, harmful, out / "score_distributions.png")
    return summary


def _write_rows(out: Path, modes: list[str], pool: PoolIndex, scores: dict, rank: dict, keep: dict,
                wanted: set[int] | None = None, block: int = 65536) -> dict[int, SFTRow]:
    """``scores.jsonl`` and ``selected.jsonl`` of every mode, row by row in one pass over the pool file;
    returns the rows ``wanted`` (by index) for the explanations.

    Per-row numbers are turned into Python values ``block`` rows at a time, so memory stays bounded.
    """
    texts: dict[int, SFTRow] = {}
    with ExitStack() as stack:
        files = {}
        for mode in modes:
            for name in ("scores", "selected"):
                tmp = stack.enter_context(atomic_file(out / mode / f"{name}.jsonl"))
                files[mode, name] = stack.enter_context(tmp.open("w"))
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


# ----- explanations --------------------------------------------------------------------------------------
def ends(order: torch.Tensor, k: int) -> list[int]:
    """Row indices of the ``k`` highest- and ``k`` lowest-ranked rows (each row once), by rank."""
    return order[:k].tolist() + order[max(k, len(order) - k):].tolist()


def explain_scores(features_dir: str | Path, explained: dict[str, list[int]], args: SelectionArgs,
                   targets: list[PairRow]) -> dict[str, torch.Tensor]:
    """Per mode: each explained row's score split over the target pairs [rows, m] (float64).

    ``s(z) = sum_i lr_i <f_i(z), d_i>`` and every ``d_i`` is a sum of one term per pair, so the split is
    exact; for a per-subtask mode only the pairs of the row's winning subtask count. Reads the stores a
    second time, only the shards holding the explained rows.
    """
    subtasks = [t.subtask for t in targets]
    union = sorted({i for rows in explained.values() for i in rows})
    where = {i: j for j, i in enumerate(union)}
    total = {m: torch.zeros(len(union), len(targets), dtype=torch.float64) for m in explained}
    for _, pstore, tstore in _stores(Path(features_dir), args.epochs, need_target=True, verify=False):
        lr = float(pstore.manifest["lr_mean"])
        feats = pstore.rows("features", union)
        chosen, rejected = tstore.load("chosen"), tstore.load("rejected")
        pi = preference_weights(tstore.load("lbar_chosen").double(), tstore.load("lbar_rejected").double())
        for mode in explained:
            total[mode] += lr * contributions(mode, feats, chosen, rejected, pi, subtasks, args.per_subtask_direction)
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
    atomic_write_text(path, "".join(lines))


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
