"""The first-order claim, measured directly: how much does each mode's direction raise held-out margins?

At a warmup checkpoint ``theta`` (LoRA parameters only), per target pair ``q`` the exact plain gradients
``C_q = grad l(q, y+)`` and ``R_q = grad l(q, y-)`` (one backward per row, no projection) and
``pi_q = sigmoid(lbar+_q - lbar-_q)`` give each gradient mode's direction ``d = scoring.direction(mode, C, R,
pi)``, the very direction the scorer takes inner products with (there in a projected, preconditioned space).
Training on a row ``z`` moves ``theta`` by ``-lr * g(z)``, so ``-d`` is the move a mode asks for. The behaviour
is the mean margin ``M(theta) = mean_q' lbar(y+|q') - lbar(y-|q')`` over **held-out** pairs ``q'``.

- ``slope(model, held, d)``: ``<grad M, -d/|d|>``, the exact first-order gain of a unit step along the mode's
  direction (no step size).
- ``step_gain(model, held, d, size)``: ``M(theta - size d/|d|) - M(theta)``, the same for a finite step.
- ``train_gain(model, rows, held, ...)``: ``M`` after one epoch of AdamW on a mode's top-scored rows (the rows it
  selects), minus ``M(theta)``: the claim as a user meets it.

Every function leaves the model's parameters as it found them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from prism_lightning.data.tokenize import pad_batch
from prism_lightning.influence.objective import row_logprob
from prism_lightning.influence.scoring import direction, preference_weights


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable (LoRA) parameters, in a fixed order: the coordinates of every flat vector here."""
    return [p for _, p in sorted(model.named_parameters()) if p.requires_grad]


def row_lbar(model: nn.Module, rows: Sequence, pad_id: int) -> torch.Tensor:
    """``lbar`` [B] of encoded rows (one batch)."""
    batch = pad_batch(list(rows), pad_id)
    return row_logprob(model, batch)


def margin(model: nn.Module, chosen: Sequence, rejected: Sequence, pad_id: int, chunk: int = 64) -> torch.Tensor:
    """``M``: mean ``lbar(y+) - lbar(y-)`` over the pairs (differentiable; ``chunk`` pairs per forward)."""
    total = 0.0
    for s in range(0, len(chosen), chunk):
        lbar = row_lbar(model, [*chosen[s:s + chunk], *rejected[s:s + chunk]], pad_id)
        half = len(lbar) // 2
        total = total + (lbar[:half] - lbar[half:]).sum()
    return total / len(chosen)


def flat_grad(value: torch.Tensor, params: list[nn.Parameter], retain: bool = False) -> torch.Tensor:
    """``grad value`` over ``params`` as one float64 vector (``retain``: keep the graph for another)."""
    grads = torch.autograd.grad(value, params, allow_unused=True, retain_graph=retain)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)])


def pair_gradients(model: nn.Module, chosen: Sequence, rejected: Sequence,
                   pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact per-row loss gradients ``C`` [m, P], ``R`` [m, P] (one backward per row) and ``pi`` [m]."""
    params = lora_parameters(model)
    c_rows, r_rows, lbars = [], [], []
    for c, r in zip(chosen, rejected):
        lbar = row_lbar(model, [c, r], pad_id)
        c_rows.append(flat_grad(-lbar[0], params, retain=True))
        r_rows.append(flat_grad(-lbar[1], params))
        lbars.append(lbar.detach().double())
    lbar = torch.stack(lbars)
    return torch.stack(c_rows), torch.stack(r_rows), preference_weights(lbar[:, 0], lbar[:, 1])


def directions(modes: Sequence[str], chosen: torch.Tensor, rejected: torch.Tensor,
               pi: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each gradient mode's direction ``d`` [P] over all the pairs (``less``: the mean unit chosen gradient)."""
    return {m: direction(m, chosen, rejected, pi) for m in modes}


@contextmanager
def restored(params: list[nn.Parameter]) -> Iterator[None]:
    """Whatever the block does to ``params``, their original values after it."""
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


@contextmanager
def moved(params: list[nn.Parameter], delta: torch.Tensor) -> Iterator[None]:
    """``params + delta`` (a flat vector) inside the block; the original values after it."""
    with restored(params):
        with torch.no_grad():
            offset = 0
            for p in params:
                p.add_(delta[offset:offset + p.numel()].view_as(p).to(p.dtype))
                offset += p.numel()
        yield


def slope(model: nn.Module, held: tuple[Sequence, Sequence], d: torch.Tensor, pad_id: int) -> float:
    """``<grad M, -d/|d|>``: the held-out margin's rate of change along the mode's move."""
    grad = flat_grad(margin(model, *held, pad_id), lora_parameters(model))
    return float(grad @ (-d / d.norm().clamp_min(1e-30)))


def step_gain(model: nn.Module, held: tuple[Sequence, Sequence], d: torch.Tensor, size: float,
              pad_id: int) -> float:
    """``M(theta - size d/|d|) - M(theta)``."""
    with torch.no_grad():
        before = float(margin(model, *held, pad_id))
        with moved(lora_parameters(model), -size * d / d.norm().clamp_min(1e-30)):
            after = float(margin(model, *held, pad_id))
    return after - before


def train_gain(model: nn.Module, rows: Sequence, held: tuple[Sequence, Sequence], pad_id: int, lr: float,
               batch_size: int, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> float:
    """``M`` after one epoch of AdamW (no weight decay) over ``rows`` in their order, minus ``M`` before."""
    params = lora_parameters(model)
    with torch.no_grad():
        before = float(margin(model, *held, pad_id))
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    with restored(params):
        for s in range(0, len(rows), batch_size):
            opt.zero_grad()
            (-row_lbar(model, rows[s:s + batch_size], pad_id).mean()).backward()
            opt.step()
        with torch.no_grad():
            return float(margin(model, *held, pad_id)) - before
