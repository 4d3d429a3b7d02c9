"""How well a ranking finds known harmful rows: AUROC, precision@k, recall (torchmetrics)."""

from __future__ import annotations

import torch


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` as a detector of ``positive`` rows (Mann-Whitney U).

    One sort and a few per-row integers: ``(sum of the positives' ranks - P (P + 1) / 2) / (P N)`` with
    tied scores given their average rank, which equals the trapezoidal ROC area.
    """
    positive = positive.bool()
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    values, order = torch.sort(scores.double(), stable=True)
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    del values
    ends = torch.cumsum(counts, 0).double()  # rank of the last row of each group of tied scores
    average = ends - (counts.double() - 1) / 2
    rank_sum = float(average[inverse][positive[order]].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def harm_metrics(scores: torch.Tensor, harmful: torch.Tensor, k: int) -> dict[str, float]:
    """AUROC of ``-score`` for ``harmful``, and precision/recall of harmful rows among the bottom ``k``.

    Undefined numbers (a set with no harmful or no clean row) are ``nan``.
    """
    harmful = harmful.bool()
    n_pos = int(harmful.sum())
    out = {"rows": int(harmful.numel()), "harmful": n_pos, "k": int(k)}
    if n_pos == 0 or n_pos == harmful.numel():
        out.update(auroc=float("nan"), precision_at_k=float("nan"), recall_at_k=float("nan"))
        return out
    out["auroc"] = auroc(-scores, harmful)
    bottom = torch.argsort(scores.double(), stable=True)[:k]
    hits = int(harmful[bottom].sum())
    out["precision_at_k"] = hits / max(1, k)
    out["recall_at_k"] = hits / n_pos
    return out


def ranking_report(scores: dict[str, torch.Tensor], harmful: torch.Tensor, subtasks: torch.Tensor,
                   names: list[str], fraction: float) -> dict:
    """Per mode: metrics over the whole pool and within the contaminated subtask(s) only.

    ``subtasks`` [n] are integer codes into ``names``. ``k`` is ``fraction`` of the rows in each view.
    The within-subtask view is the honest one: telling the contaminated skill apart from the others
    is easy and finds no harmful row.
    """
    codes = torch.unique(subtasks[harmful.bool()])
    inside = torch.isin(subtasks, codes)
    report = {"contaminated_subtasks": sorted(names[int(c)] for c in codes), "fraction": fraction, "modes": {}}
    for mode, s in scores.items():
        whole = harm_metrics(s, harmful, max(1, round(fraction * len(s))))
        within = harm_metrics(s[inside], harmful[inside], max(1, round(fraction * int(inside.sum()))))
        report["modes"][mode] = {"whole_pool": whole, "within_subtask": within}
    return report
