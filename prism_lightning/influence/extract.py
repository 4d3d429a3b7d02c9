"""One batch of gradient features: forward, one backward, per-layer precondition + project."""

from __future__ import annotations

import torch
from torch import nn

from prism_lightning.influence.objective import packed_rows, row_logprob
from prism_lightning.influence.per_example import PerExampleGradients
from prism_lightning.influence.preconditioners import Preconditioner
from prism_lightning.influence.projection import Projector


def gradient_features(model: nn.Module, layers: dict[str, nn.Linear], batch: dict, projector: Projector,
                      preconditioner: Preconditioner | None = None,
                      normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [B, k] fp32, lbar [B])`` for a batch: ``unit(sum_m P_m^T Gamma(g_m(z)))`` per row.

    ``g_m(z)`` is row z's exact gradient of its token-mean response loss w.r.t. layer m's weight,
    preconditioned while still shaped [B, out, in], then flattened for the projection. A packed batch
    (``position_ids``, no padding) gives the same features as the padded one.
    """
    row_of = packed_rows(batch["position_ids"]) if "position_ids" in batch else None
    rows = batch["input_ids"].shape[0] if row_of is None else int(row_of[-1]) + 1
    device = batch["input_ids"].device
    out = projector.new_output(rows, device)

    def consume(name: str, grad: torch.Tensor) -> None:
        if preconditioner is not None:
            grad = preconditioner.precondition(name, grad)
        projector.add(out, name, grad.reshape(rows, -1))

    with torch.enable_grad(), PerExampleGradients(layers, consume, row_of):
        lbar = row_logprob(model, batch)
        (-lbar).sum().backward()
    model.zero_grad(set_to_none=True)
    if normalize:
        out = out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return out, lbar.detach().float()
