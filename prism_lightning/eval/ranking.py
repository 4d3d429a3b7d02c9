"""How well a ranking finds known harmful rows: AUROC and ROC (torchmetrics), precision@k, recall."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def float64_rates():
    """torchmetrics divides integer counts into rates in the default dtype (float32, an AUROC off by ~1e-7):
    float64 while it computes."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` as a detector of ``positive`` rows (``binary_auroc``, exact: every
    score is a threshold, tied scores count half)."""
    from torchmetrics.functional.classification import binary_auroc

    with float64_rates():
        return float(binary_auroc(scores.double(), positive.long()))


def roc(scores: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """False and true positive rates of ``scores`` as a detector of ``positive`` rows (``binary_roc``)."""
    from torchmetrics.functional.classification import binary_roc

    with float64_rates():
        fpr, tpr, _ = binary_roc(scores.double(), positive.long())
    return fpr, tpr


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
