"""Preconditioners of per-example gradients: ``Gamma_i`` of the score ``<Gamma_i(g(z)), g_i>`` (docs/method.md).

A preconditioner is a registered class with two methods, in the style of kronfluence's strategies:

- ``load(folder, info)``: read what it needs from one warmup checkpoint (``epoch-N/``: adapter,
  ``optimizer.safetensors`` with Adam's moments, ``curvature.safetensors`` with fitted Kronecker
  factors, ``checkpoint.json`` as ``info``);
- ``precondition(name, g)``: map the per-example gradients ``g`` [B, out, in] of the LoRA layer
  ``name`` (its weight's shape, one row per example) to ``Gamma(g)`` of the same shape.

A class with ``needs_fit`` needs a fitting pass over the warmup rows at each checkpoint first
(``python -m prism_lightning curvature``; the pipeline runs it). Adding one is one class here,
registered under its name(s), plus its test.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch

from prism_lightning.influence import curvature

PRECONDITIONERS: dict[str, type[Preconditioner]] = {}


def register(*names: str):
    """Class decorator: make a preconditioner available under ``names`` (config values)."""

    def add(cls):
        for name in names:
            PRECONDITIONERS[name] = cls
        return cls

    return add


class Preconditioner:
    """Base class: the identity (``Gamma(g) = g``)."""

    needs_optimizer_state: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = False  # reads factors fitted by the curvature stage

    def __init__(self, device: torch.device | str = "cpu", damping: float = 0.1):
        self.device, self.damping = device, damping

    def load(self, folder: Path, info: dict) -> None:
        """Read this checkpoint's state from ``folder`` (nothing for the identity)."""

    def precondition(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """``Gamma(g)`` for layer ``name``; ``grad`` [B, out, in]."""
        return grad


register("identity", "sgd")(Preconditioner)  # ``sgd`` names LESS's plain-gradient target features


@register("adam")
class Adam(Preconditioner):
    """Adam's update for one more step on ``g`` (as in LESS): ``m' / (sqrt(v') + eps)``.

    ``m' = b1 m + (1 - b1) g``, ``v' = b2 v + (1 - b2) g^2`` with the checkpoint's moments (m, v),
    betas and eps (no bias correction: the step count is large after a warmup).
    """

    needs_optimizer_state = True
    momentum: ClassVar[bool] = True

    def load(self, folder: Path, info: dict) -> None:
        from safetensors.torch import load_file

        path = Path(folder) / "optimizer.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{folder}: no optimizer.safetensors for the {type(self).__name__} "
                                    "preconditioner; use a warmup saved by this package or `identity`")
        self.state = load_file(str(path), device=str(self.device))
        (self.beta1, self.beta2), self.eps = info["betas"], info["eps"]

    @classmethod
    def from_moments(cls, moments: dict[str, tuple[torch.Tensor, torch.Tensor]], beta1: float, beta2: float,
                     eps: float) -> Adam:
        """An instance from in-memory moments ``{layer name: (exp_avg, exp_avg_sq)}``, each shaped like the weight."""
        pre = cls()
        pre.state = {f"{n}.weight.{key}": t for n, (m, v) in moments.items()
                     for key, t in (("exp_avg", m), ("exp_avg_sq", v))}
        pre.beta1, pre.beta2, pre.eps = beta1, beta2, eps
        return pre

    def moments(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = f"{name}.weight"
        if f"{key}.exp_avg" not in self.state:
            raise KeyError(f"optimizer.safetensors has no moments for {key}; was it saved for another model?")
        return self.state[f"{key}.exp_avg"], self.state[f"{key}.exp_avg_sq"]

    def precondition(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        m, v = self.moments(name)
        return adam_precondition(grad, m, v, self.beta1, self.beta2, self.eps, self.momentum)


@register("adam_no_momentum")
class AdamNoMomentum(Adam):
    """Adam's per-coordinate scaling without its momentum term: ``g / (sqrt(v') + eps)``.

    The term ``b1 m`` of Adam's update is the same for every candidate; after a warmup it can
    outweigh the candidate's own gradient and invert a ranking (docs/evidence.md). This is the
    default for pool features, chosen by the preconditioner study there.
    """

    momentum = False


def adam_precondition(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                      beta1: float, beta2: float, eps: float, momentum: bool = True) -> torch.Tensor:
    """``m' / (sqrt(v') + eps)`` (``momentum``) or ``g / (sqrt(v') + eps)``; moments broadcast over rows.

    ``m' = b1 m + (1 - b1) g``, ``v' = b2 v + (1 - b2) g^2``; ``grad`` [B, ...], moments [...].
    """
    v = beta2 * exp_avg_sq + (1 - beta2) * grad.square()
    m = beta1 * exp_avg + (1 - beta1) * grad if momentum else grad
    return m / (v.sqrt() + eps)


@register("kfac")
class KFAC(Preconditioner):
    """K-FAC: ``(S (x) A + d I)^-1 g`` with the token covariances of each LoRA layer's inputs (A) and output
    gradients (S) over the warmup rows, ``d = damping x mean(s a^T)`` (``influence.curvature``)."""

    needs_fit = True

    def load(self, folder: Path, info: dict) -> None:
        self.factors = curvature.load_factors(folder, info["adapter_sha256"], self.device)
        self._inverse: dict[str, torch.Tensor] = {}

    def eigenvalues(self, layer: dict[str, torch.Tensor]) -> torch.Tensor:
        return curvature.kfac_eigenvalues(layer["gradient_eigenvalues"], layer["activation_eigenvalues"])

    def precondition(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        if name not in self.factors:
            raise KeyError(f"curvature.safetensors has no factors for {name}; was it fitted for another model?")
        layer = self.factors[name]
        if name not in self._inverse:
            self._inverse[name] = curvature.inverse_eigenvalues(self.eigenvalues(layer), self.damping)
        return curvature.precondition_eigen(grad, layer["gradient_eigenvectors"].to(grad.dtype),
                                            layer["activation_eigenvectors"].to(grad.dtype), self._inverse[name])


@register("ekfac")
class EKFAC(KFAC):
    """EK-FAC: K-FAC's eigenbasis with the Fisher's own diagonal in it, ``Lambda = mean_b (Q_S^T G_b Q_A)^2``
    over the warmup rows' exact per-example gradients, ``d = damping x mean(Lambda)``."""

    def eigenvalues(self, layer: dict[str, torch.Tensor]) -> torch.Tensor:
        return layer["lambda"]


PreconditionerName = Literal[tuple(PRECONDITIONERS)]  # config values, derived from the registry


def make_preconditioner(name: str, device: torch.device | str = "cpu", damping: float = 0.1) -> Preconditioner:
    """An instance of the preconditioner registered as ``name`` (``damping``: relative, for kfac/ekfac)."""
    if name not in PRECONDITIONERS:
        raise ValueError(f"preconditioner {name!r} is not one of {sorted(PRECONDITIONERS)}")
    return PRECONDITIONERS[name](device, damping)


def needs_fit(name: str) -> bool:
    """Whether preconditioner ``name`` needs the curvature stage's factors."""
    return PRECONDITIONERS[name].needs_fit
