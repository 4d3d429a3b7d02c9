"""Turning scores into subsets: forward selection (top) and reverse repair (drop the bottom).

Orders are computed with torch (a stable sort), so memory and time stay proportional to the pool's
row count with small constants; ties are broken by row order (the earlier row ranks first).
"""

from __future__ import annotations

import math

import torch

from prism_lightning.errors import SettingsError


def budget(n: int, fraction: float | None, k: int | None) -> int:
    """Rows to select/remove: ``k`` if given, else ``floor(fraction * n)``; refuses 0 or more than n."""
    if (fraction is None) == (k is None):
        raise SettingsError("selection: give exactly one of selection.fraction and selection.k")
    count = k if k is not None else math.floor(fraction * n + 1e-9)
    if count <= 0:
        raise SettingsError(f"selection: the budget is 0 rows (fraction={fraction}, k={k}, pool of {n} rows); "
                            "raise fraction or set k")
    if count > n:
        raise SettingsError(f"selection: the budget of {count} rows (k={k}) exceeds the pool of {n} rows; lower k "
                            "or give a fraction")
    return count


def rank_order(scores: torch.Tensor) -> torch.Tensor:
    """Row indices [n] from most helpful (highest score) to most harmful; ties keep row order."""
    return torch.sort(scores, descending=True, stable=True).indices


def ranks(order: torch.Tensor) -> torch.Tensor:
    """Rank of each row (1 = most helpful) from ``rank_order``'s output."""
    out = torch.empty(len(order), dtype=torch.int32)
    out[order] = torch.arange(1, len(order) + 1, dtype=torch.int32)
    return out


def _quota(subtasks: torch.Tensor, count: int) -> dict[int, int]:
    """Split ``count`` over subtask codes in proportion to their sizes (largest remainder, ties by code)."""
    codes, sizes = torch.unique(subtasks, return_counts=True)
    n = len(subtasks)
    exact = {int(c): count * int(s) / n for c, s in zip(codes, sizes)}
    out = {c: math.floor(v) for c, v in exact.items()}
    for c in sorted(exact, key=lambda c: (-(exact[c] - out[c]), c))[: count - sum(out.values())]:
        out[c] += 1
    return out


def choose(scores: torch.Tensor, task: str, fraction: float | None = None, k: int | None = None,
           subtasks: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask [n] of the rows to train on.

    ``forward``: the top ``count`` rows by score. ``repair``: all but the bottom ``count`` rows.
    With ``subtasks`` (integer codes [n]) the count is split per subtask in proportion to its size.
    """
    if task not in ("forward", "repair"):
        raise ValueError(f"selection.task={task!r} must be 'forward' or 'repair'")
    n = len(scores)
    count = budget(n, fraction, k)
    order = rank_order(scores)
    walk = order if task == "forward" else order.flip(0)
    picked = torch.zeros(n, dtype=torch.bool)
    if subtasks is None:
        picked[walk[:count]] = True
    else:
        walk_codes = subtasks[walk]
        for code, q in _quota(subtasks, count).items():
            picked[walk[walk_codes == code][:q]] = True
    return picked if task == "forward" else ~picked
