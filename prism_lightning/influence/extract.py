"""One batch of gradient features: forward, one backward, per-module precondition + project."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prism_lightning.data.tokenize import mean_logprob
from prism_lightning.influence.per_example import PerExampleGradients, adam_precondition
from prism_lightning.influence.projection import Projector


def adam_preconditioner(moments: dict[str, tuple[torch.Tensor, torch.Tensor]], beta1: float, beta2: float,
                        eps: float, momentum: bool = True) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """``(layer name, g [B, P]) -> Gamma(g)`` with each layer's saved Adam moments (flattened)."""

    def apply(name: str, grad: torch.Tensor) -> torch.Tensor:
        m, v = moments[name]
        return adam_precondition(grad, m, v, beta1, beta2, eps, momentum)

    return apply


def gradient_features(model: nn.Module, layers: dict[str, nn.Linear], batch: dict, projector: Projector,
                      precondition: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                      normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [B, k] fp32, lbar [B])`` for a batch: ``unit(sum_m P_m^T Gamma(g_m(z)))`` per row.

    ``g_m(z)`` is row z's exact gradient of its token-mean response loss w.r.t. layer m's weight.
    """
    rows = batch["input_ids"].shape[0]
    device = batch["input_ids"].device
    out = projector.new_output(rows, device)

    def consume(name: str, grad: torch.Tensor) -> None:
        projector.add(out, name, precondition(name, grad) if precondition else grad)

    with torch.enable_grad(), PerExampleGradients(layers, consume):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lbar = mean_logprob(logits, batch["labels"])
        (-lbar).sum().backward()
    model.zero_grad(set_to_none=True)
    if normalize:
        out = out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return out, lbar.detach().float()
