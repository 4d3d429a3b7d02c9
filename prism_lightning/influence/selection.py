"""Turning scores into subsets: forward selection (top) and reverse repair (drop the bottom)."""

from __future__ import annotations

import math

import torch


def budget(n: int, fraction: float | None, k: int | None) -> int:
    """Rows to select/remove: ``k`` if given, else ``floor(fraction * n)``; refuses 0 or more than n."""
    if (fraction is None) == (k is None):
        raise ValueError("give exactly one of selection.fraction and selection.k")
    count = k if k is not None else math.floor(fraction * n + 1e-9)
    if count <= 0:
        raise ValueError(f"selection budget is 0 rows (fraction={fraction}, k={k}, pool of {n} rows); "
                         "raise fraction or set k")
    if count > n:
        raise ValueError(f"selection budget {count} exceeds the pool of {n} rows")
    return count


def rank_order(scores: torch.Tensor, ids: list[str]) -> list[int]:
    """Row indices from most helpful (highest score) to most harmful; ties broken by id."""
    s = scores.tolist()
    return sorted(range(len(ids)), key=lambda i: (-s[i], ids[i]))


def _quota(subtasks: list[str], count: int) -> dict[str, int]:
    """Split ``count`` over subtasks in proportion to their sizes (largest remainder, ties by name)."""
    sizes: dict[str, int] = {}
    for s in subtasks:
        sizes[s] = sizes.get(s, 0) + 1
    n = len(subtasks)
    exact = {s: count * c / n for s, c in sizes.items()}
    out = {s: math.floor(v) for s, v in exact.items()}
    for s in sorted(exact, key=lambda s: (-(exact[s] - out[s]), s))[: count - sum(out.values())]:
        out[s] += 1
    return out


def choose(scores: torch.Tensor, ids: list[str], task: str, fraction: float | None = None,
           k: int | None = None, subtasks: list[str] | None = None) -> torch.Tensor:
    """Boolean mask of the rows to train on.

    ``forward``: the top ``count`` rows by score. ``repair``: all but the bottom ``count`` rows.
    With ``subtasks`` the count is split per subtask in proportion to its size (a quota).
    """
    if task not in ("forward", "repair"):
        raise ValueError(f"selection.task={task!r} must be 'forward' or 'repair'")
    n = len(ids)
    count = budget(n, fraction, k)
    order = rank_order(scores, ids)
    picked = torch.zeros(n, dtype=torch.bool)
    if subtasks is None:
        chosen = order[:count] if task == "forward" else order[::-1][:count]
    else:
        quota, chosen = _quota(subtasks, count), []
        walk = order if task == "forward" else order[::-1]
        for sub, q in quota.items():
            chosen += [i for i in walk if subtasks[i] == sub][:q]
    picked[chosen] = True
    return picked if task == "forward" else ~picked
