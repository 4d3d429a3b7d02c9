"""Exact per-example gradients of trainable ``nn.Linear`` layers in one forward and one backward.

For a linear layer ``y = x W^T`` applied to the tokens of example b, the gradient of a loss that
is a sum of per-example terms ``L = sum_b l_b`` with respect to ``W`` splits exactly as

    dl_b/dW = sum_t (dL/dy[b, t])^T x[b, t]        (an einsum over tokens),

because example b's loss depends only on example b's activations. So hooks on the LoRA A/B
layers record ``x`` (forward) and ``dL/dy`` (backward) and the B separate gradients come out of a
single backward pass. Padding tokens get zero ``dL/dy`` (they carry no loss and, with right
padding and a causal mask, influence no real token), so they never leak into a gradient.

The gradients are handed to ``consume(name, grads[B, out, in])`` module by module as the
backward pass reaches them, so peak memory is B x (largest module), not B x P.

A packed batch (all rows in one sequence, no padding: ``data.tokenize.pack_batch``) gives ``x`` and ``dL/dy``
as [1, N, .]; with ``rows`` (each token's row) the sum over tokens runs per row instead: the same einsum
after the tokens are laid out row by row (``by_row``), so row b's gradient is still the sum over its own tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def lora_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Trainable ``nn.Linear`` modules by name (the LoRA A/B layers of a peft model).

    Raises if some trainable parameter is not such a layer's weight (e.g. a trained embedding or
    bias), since its per-example gradient would be silently missing.
    """
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and m.weight.requires_grad}
    covered = {id(m.weight) for m in layers.values()}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if missing:
        raise ValueError(f"per-example gradients cover trainable nn.Linear weights only; also trainable: "
                         f"{missing[:3]} ... (train LoRA adapters without bias or modules_to_save)")
    if not layers:
        raise ValueError("the model has no trainable nn.Linear layer (is the LoRA adapter loaded trainable?)")
    return layers


class PerExampleGradients:
    """Context manager that streams per-example weight gradients of the given layers.

    Usage::

        with PerExampleGradients(layers, consume):
            per_row_loss = ...          # [B], each row's own loss
            per_row_loss.sum().backward()

    ``consume(name, g)`` receives ``g`` [B, out, in] in fp32 (each row shaped like the weight).
    """

    def __init__(self, layers: dict[str, nn.Linear], consume: Callable[[str, torch.Tensor], None],
                 rows: torch.Tensor | None = None):
        self.layers, self.consume = layers, consume
        self.layout = None if rows is None else row_layout(rows)
        self._inputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            self._inputs[name] = inputs[0].detach()

            def on_grad(grad_out: torch.Tensor) -> None:
                x = self._inputs.pop(name, None)
                if x is None:  # recomputation pass of activation checkpointing: already consumed
                    return
                if self.layout is not None:  # packed: [1, N, .] -> [rows, longest row, .]
                    grad_out, x = by_row(grad_out[0], self.layout), by_row(x[0], self.layout)
                self.consume(name, torch.einsum("bto,bti->boi", grad_out.float(), x.float()))

            output.register_hook(on_grad)
        return hook

    def __enter__(self) -> PerExampleGradients:
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._inputs.clear()


def row_layout(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Where each token [N] of a packed batch goes in a [rows, longest row] layout: ``(row, slot, R, L)``."""
    counts = torch.bincount(rows)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(rows), device=rows.device) - starts[rows]
    return rows, slot, len(counts), int(counts.max())


def by_row(tokens: torch.Tensor, layout: tuple[torch.Tensor, torch.Tensor, int, int]) -> torch.Tensor:
    """Tokens [N, d] of a packed batch as [R, L, d], zeros after each row's end (zeros add nothing to a sum)."""
    rows, slot, n_rows, longest = layout
    out = tokens.new_zeros(n_rows, longest, tokens.shape[-1])
    out[rows, slot] = tokens
    return out
