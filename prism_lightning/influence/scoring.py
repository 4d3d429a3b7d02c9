"""PRISM scoring: preference weights, target directions for every mode, streamed scores.

Notation (docs/method.md): per checkpoint i, candidate features ``f(z) = Gamma_i(g(z))`` [n, k], target
features ``C_q = g(q, y+)``, ``R_q = g(q, y-)`` [m, k] and length-normalised log-likelihoods
``lbar+_q``, ``lbar-_q``. Scores are ``s_i(z) = <f(z), d_i>`` for a target direction ``d_i`` and
``s(z) = sum_i lr_i s_i(z)`` with ``lr_i`` the mean learning rate of warmup epoch i.
``s(z) > 0``: training on z raises the target margin (helpful); ``s(z) < 0``: harmful.

Modes are the rows of ``MODES`` (one scoring function; each gradient mode is columns of one
direction matrix, so every store is read once for all modes). Each direction is a sum of one term
per target pair (``Mode.parts``), so every score splits exactly into per-pair contributions
(``contributions``, written to ``explain.jsonl`` by ``select``):

- ``prism``: ``d = (1/m) sum_q pi_q (C_q - R_q)``, ``pi_q = sigmoid(lbar+_q - lbar-_q)``.
- ``prism_uniform``: ``d = (1/m) sum_q (C_q - R_q)`` (ablation: no preference weights).
- ``prism_no_anchor``: ``d = (1/m) sum_q pi_q C_q`` (ablation: no rejected anchor).
- ``less``: per target cosine ``<unit f, unit C_q>``, mean within a subtask, lr-weighted sum over
  checkpoints, then max over subtasks (as in LESS).
- ``ifguide``: ``d = unit(mean_q C_q) - unit(mean_q R_q)``: the unpaired contrast of IF-Guide's
  wanted vs unwanted query sets; on paired data it differs from ``prism_uniform`` only by
  normalising the two means separately.
- ``random``: seeded standard-normal scores; ``loss``: ``-sum_i lr_i loss_i(z)`` (no gradients).

With ``per_subtask=True`` every gradient mode builds one direction per target subtask and takes
the max over subtasks after the checkpoint sum, like ``less``. Adding a mode is one row of
``MODES`` plus its test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch


def preference_weights(lbar_chosen: torch.Tensor, lbar_rejected: torch.Tensor) -> torch.Tensor:
    """``pi_q = sigmoid(lbar(y+|q) - lbar(y-|q))``: Bradley-Terry, no temperature, not renormalised."""
    return torch.sigmoid(lbar_chosen - lbar_rejected)


def _unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-12)


def random_scores(n: int, seed: int) -> torch.Tensor:
    """Seeded N(0, 1) scores (the ``random`` baseline)."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Inputs(NamedTuple):
    """What a mode without gradients scores from: pool size, seed, and ``sum_i lr_i loss_i(z)`` [n]."""

    rows: int
    seed: int
    loss: torch.Tensor | None


@dataclass(frozen=True)
class Mode:
    """One scoring mode (a row of ``MODES``).

    parts: ``(chosen [m, k], rejected [m, k], pi [m]) -> [m, k]`` for a gradient mode: one term per target
        pair, whose sum is the mode's direction ``d`` (so a score splits exactly over the pairs).
    per_subtask: always one direction per target subtask, max over subtasks after the checkpoint sum.
    cosine: divide each candidate's dot product by its feature norm (cosine similarity).
    scores: ``Inputs -> [n]`` for a mode without gradients.
    needs_loss: reads the per-row losses of the pool stores.
    """

    name: str
    parts: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    per_subtask: bool = False
    cosine: bool = False
    scores: Callable[[Inputs], torch.Tensor] | None = None
    needs_loss: bool = False


MODES: dict[str, Mode] = {m.name: m for m in [
    Mode("prism", parts=lambda c, r, pi: pi[:, None] * (c - r) / len(c)),
    Mode("prism_uniform", parts=lambda c, r, pi: (c - r) / len(c)),
    Mode("prism_no_anchor", parts=lambda c, r, pi: pi[:, None] * c / len(c)),
    Mode("less", parts=lambda c, r, pi: _unit(c) / len(c), per_subtask=True, cosine=True),
    # unit(mean C) - unit(mean R), written as one term per pair
    Mode("ifguide", parts=lambda c, r, pi: c / (len(c) * c.mean(0).norm().clamp_min(1e-12))
         - r / (len(r) * r.mean(0).norm().clamp_min(1e-12))),
    Mode("random", scores=lambda x: random_scores(x.rows, x.seed)),
    Mode("loss", scores=lambda x: -x.loss, needs_loss=True),
]}
GRADIENT_MODES = tuple(name for name, m in MODES.items() if m.parts is not None)
ModeName = Literal[tuple(MODES)]  # config values, derived from the table


def direction(mode: str, chosen: torch.Tensor, rejected: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """The target direction [k] of one gradient mode from one group of pairs (see module doc)."""
    if mode not in GRADIENT_MODES:
        raise ValueError(f"mode {mode!r} has no gradient direction; gradient modes: {GRADIENT_MODES}")
    return MODES[mode].parts(chosen, rejected, pi).sum(0)


def subtask_groups(subtasks: list[str], per_subtask: bool) -> dict[str, list[int]]:
    """Target rows per group: one group ``all`` or one per subtask (sorted)."""
    if not per_subtask:
        return {"all": list(range(len(subtasks)))}
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(subtasks):
        groups.setdefault(s, []).append(i)
    return dict(sorted(groups.items()))


def direction_matrix(modes: Iterable[str], chosen: torch.Tensor, rejected: torch.Tensor, pi: torch.Tensor,
                     subtasks: list[str], per_subtask: bool) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """All gradient modes' directions as columns [k, D] and the (mode, group) of each column.

    A mode with ``Mode.per_subtask`` (``less``) is always per subtask; the others when ``per_subtask``.
    """
    cols, keys = [], []
    for mode in modes:
        if mode not in GRADIENT_MODES:
            continue
        for group, rows in subtask_groups(subtasks, per_subtask or MODES[mode].per_subtask).items():
            idx = torch.tensor(rows)
            cols.append(direction(mode, chosen[idx].double(), rejected[idx].double(), pi[idx].double()))
            keys.append((mode, group))
    if not cols:
        return torch.zeros(chosen.shape[1], 0, dtype=torch.float64), []
    return torch.stack(cols, dim=1), keys


def stream_dot(chunks: Iterable[torch.Tensor], matrix: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F @ M, ||F||_row)`` over row chunks of F (``rows`` in all), in float64; one chunk in memory at a time."""
    dots = torch.empty(rows, matrix.shape[1], dtype=torch.float64)
    norms = torch.empty(rows, dtype=torch.float64)
    start = 0
    for chunk in chunks:
        c = chunk.double()
        dots[start: start + len(c)] = c @ matrix
        norms[start: start + len(c)] = c.norm(dim=1)
        start += len(c)
    if start != rows:
        raise ValueError(f"the store holds {start} rows, not {rows}")
    return dots, norms


def checkpoint_scores(chunks: Iterable[torch.Tensor], matrix: torch.Tensor, keys: list[tuple[str, str]],
                      rows: int) -> torch.Tensor:
    """One checkpoint's dot products [n, D] with every direction column; cosine modes divide by ``||f||``."""
    dots, norms = stream_dot(chunks, matrix, rows)
    cos = [j for j, (m, _) in enumerate(keys) if MODES[m].cosine]
    dots[:, cos] /= norms.clamp_min(1e-12)[:, None]
    return dots


def reduce_groups(scores: torch.Tensor, keys: list[tuple[str, str]], modes: Iterable[str]) -> dict[str, torch.Tensor]:
    """Per mode: its columns' max over subtask groups (a single column is returned as is)."""
    out = {}
    for mode in modes:
        cols = [j for j, (m, _) in enumerate(keys) if m == mode]
        if cols:
            out[mode] = scores[:, cols].max(dim=1).values
    return out


def contributions(mode: str, feats: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, pi: torch.Tensor,
                  subtasks: list[str], per_subtask: bool) -> torch.Tensor:
    """Per-pair terms [r, m] of one checkpoint's score ``s_i`` for candidate features ``feats`` [r, k].

    Column q is ``<f(z), parts_q>`` (divided by ``||f(z)||`` for cosine modes), with ``parts_q`` the
    pair's term of its group's direction; summed over a group's columns it is that group's
    ``checkpoint_scores`` column. Multiply by ``lr_i``, sum over checkpoints, then keep the winning
    group (``keep_winning_group``) to split the final score exactly.
    """
    f = feats.double()
    out = torch.zeros(len(f), len(subtasks), dtype=torch.float64)
    for rows in subtask_groups(subtasks, per_subtask or MODES[mode].per_subtask).values():
        idx = torch.tensor(rows)
        parts = MODES[mode].parts(chosen[idx].double(), rejected[idx].double(), pi[idx].double())
        out[:, idx] = f @ parts.T
    if MODES[mode].cosine:
        out /= f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return out


def keep_winning_group(parts: torch.Tensor, subtasks: list[str], per_subtask: bool, mode: str) -> torch.Tensor:
    """Zero every pair outside the group whose sum is largest per row (the max over groups of ``reduce_groups``)."""
    groups = list(subtask_groups(subtasks, per_subtask or MODES[mode].per_subtask).values())
    if len(groups) == 1:
        return parts
    sums = torch.stack([parts[:, g].sum(1) for g in groups], dim=1)
    winner = sums.argmax(dim=1)
    keep = torch.zeros_like(parts, dtype=torch.bool)
    for j, g in enumerate(groups):
        keep[:, g] = (winner == j)[:, None]
    return parts * keep
