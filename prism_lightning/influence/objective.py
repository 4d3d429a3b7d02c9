"""The training objective that every gradient in the project differentiates.

A row is a prompt and a response; ``labels`` [B, T] hold the next token to predict at response
positions and ``IGNORE`` elsewhere (prompt and padding), so losses and likelihoods cover the
response only (docs/method.md, "Quantities").
"""

from __future__ import annotations

import torch

IGNORE = -100


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: ``sum_t log p(y_t | x, y_<t)`` over response tokens, and their count.

    ``logits`` [B, T, V] predict the next token; ``labels`` [B, T] carry ``IGNORE`` off the response.
    The length-normalised log-likelihood is ``lbar = sum / count``; the loss is ``-lbar``.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE
    safe = shift_labels.clamp_min(0)
    logp = torch.log_softmax(shift_logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1), mask.sum(-1)


def mean_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``lbar`` per row: the token-mean log-likelihood of the response (the loss is ``-lbar``)."""
    total, count = sequence_logprob(logits, labels)
    return total / count.clamp_min(1)
