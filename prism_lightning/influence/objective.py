"""The training objective that every gradient in the project differentiates.

A row is a prompt and a response; ``labels`` [B, T] hold the next token to predict at response
positions and ``IGNORE`` elsewhere (prompt and padding), so losses and likelihoods cover the
response only (docs/method.md, "Quantities").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from prism_lightning.influence.varlen import packed_attention

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


def packed_rows(position_ids: torch.Tensor) -> torch.Tensor:
    """The row of each token [N] of a packed batch (``data.tokenize.pack_batch``): position ids restart at 0 with
    each row."""
    return (position_ids[0] == 0).long().cumsum(0) - 1


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's LM head (Hugging Face ``get_output_embeddings``), or ``None`` for a model without one."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the positions whose next token carries a label (the only logits any loss reads)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


@contextmanager
def head_only_at(model: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """Inside, the model's LM head runs only on the hidden states at ``keep`` [B, T]: the forward's ``logits`` are
    ``[N, vocab]`` for the ``N`` kept positions in row-major order, and no ``[B, T, vocab]`` tensor exists.

    A pre-hook on ``model.get_output_embeddings()`` gathers the rows before the head's matmul, inside the model's
    own forward (so a sharded model's head is still gathered by its wrapper; the head may carry LoRA).
    """
    head = output_head(model)
    if head is None:  # not a Hugging Face causal LM: its forward computes every position's logits
        yield
        return

    def gather(_module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        if hidden.shape[:2] != keep.shape:  # a forward this context was not made for (e.g. generation)
            return args
        return (hidden[keep], *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def row_logprob(model: nn.Module, batch: dict) -> torch.Tensor:
    """``lbar`` [B] of a batch, the LM head run only where a label is predicted: the same value as
    ``mean_logprob(model(...).logits, labels)`` without the ``[B, T, vocab]`` logits (for a 128k vocabulary those
    dominate the memory of a forward over long prompts).

    A padded batch has ``input_ids``/``attention_mask``/``labels`` [B, T]; a packed one (``tokenize.pack_batch``)
    has ``input_ids``/``labels``/``position_ids`` [1, N] and no padding at all (``influence.varlen.packed_attention``).
    """
    labels = batch["labels"]
    keep = answer_positions(labels)
    packed = "position_ids" in batch
    with head_only_at(model, keep), (packed_attention(model) if packed else nullcontext()):
        if packed:
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if logits.dim() == 3:  # the head ran everywhere (a model without an LM head to hook): keep the same rows
        logits = logits[keep]
    targets = labels[:, 1:][keep[:, :-1]]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if packed:
        row_of = packed_rows(batch["position_ids"])
        rows, count = row_of[keep[0]], torch.bincount(row_of[keep[0]], minlength=int(row_of[-1]) + 1)
    else:
        rows, count = keep.nonzero()[:, 0], keep.sum(-1)
    total = torch.zeros(len(count), dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)
    return total / count.clamp_min(1)
