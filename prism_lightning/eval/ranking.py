"""How well a ranking finds known harmful rows: AUROC, precision@k, recall (torchmetrics)."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import binary_auroc


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
    out["auroc"] = float(binary_auroc(-scores.double(), harmful.long()))
    bottom = torch.argsort(scores.double(), stable=True)[:k]
    hits = int(harmful[bottom].sum())
    out["precision_at_k"] = hits / max(1, k)
    out["recall_at_k"] = hits / n_pos
    return out


def ranking_report(scores: dict[str, torch.Tensor], harmful: torch.Tensor, subtasks: list[str],
                   fraction: float) -> dict:
    """Per mode: metrics over the whole pool and within the contaminated subtask(s) only.

    ``k`` is ``fraction`` of the rows in each view. The within-subtask view is the honest one:
    telling the contaminated skill apart from the others is easy and finds no harmful row.
    """
    contaminated = sorted({s for s, h in zip(subtasks, harmful.tolist()) if h})
    inside = torch.tensor([s in contaminated for s in subtasks])
    report = {"contaminated_subtasks": contaminated, "fraction": fraction, "modes": {}}
    for mode, s in scores.items():
        whole = harm_metrics(s, harmful, max(1, round(fraction * len(s))))
        within = harm_metrics(s[inside], harmful[inside], max(1, round(fraction * int(inside.sum()))))
        report["modes"][mode] = {"whole_pool": whole, "within_subtask": within}
    return report
