"""Kronecker-factored curvature of the LoRA layers (K-FAC and EK-FAC) as plain tensor functions.

For a linear layer ``y = x W^T`` the per-example gradient is ``G_b = sum_t dy[b,t]^T x[b,t]`` [out, in]
(``influence.per_example``). The curvature the influence function inverts is the (empirical) Fisher
``F = (1/N) sum_b vec(G_b) vec(G_b)^T`` over N fitting rows, [out*in, out*in]: far too large to hold.

- **K-FAC** ("Optimizing Neural Networks with Kronecker-factored Approximate Curvature") replaces it
  by ``S (x) A`` with the token covariances ``A = E_t[x x^T]`` [in, in] of the layer's inputs and
  ``S = E_t[dy dy^T]`` [out, out] of the gradients at its outputs (both averaged over the fitting
  rows' real tokens). With ``A = Q_A diag(a) Q_A^T`` and ``S = Q_S diag(s) Q_S^T`` the inverse is
  applied in the Kronecker eigenbasis: ``(S (x) A + d I)^-1 vec(G) = vec(Q_S [(Q_S^T G Q_A) / (s a^T + d)] Q_A^T)``.
- **EK-FAC** ("Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis") keeps
  the eigenbasis and replaces ``s a^T`` by the Fisher's own diagonal in it,
  ``Lambda = (1/N) sum_b (Q_S^T G_b Q_A)^2`` [out, in], which is exactly ``diag(Q^T F Q)`` for
  ``Q = Q_S (x) Q_A``: the best diagonal approximation of F in that basis.

The damping ``d`` is ``damping x mean(eigenvalues)`` per layer (kronfluence's heuristic, scale free).
These are the same factors, normalisations and damping as kronfluence's ``kfac``/``ekfac`` strategies,
so scores agree with it (``tests/test_peers.py``). Fitting is two passes over the fitting rows:
covariances (then ``eigh`` in float64), then ``Lambda`` from the exact per-example gradients
(``modules.curvature``). The factors of one warmup checkpoint are one safetensors file beside it
(``save_factors`` / ``load_factors``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from prism_lightning.errors import StoreCorruptError, StoreMismatchError
from prism_lightning.influence.objective import row_logprob
from prism_lightning.influence.per_example import PerExampleGradients
from prism_lightning.io import atomic_file, file_sha256
from prism_lightning.provenance import Manifest

FACTORS_FILE = "curvature.safetensors"
RECORD_FILE = "curvature.json"
FORMAT = 1
KINDS = ("activation_eigenvectors", "activation_eigenvalues", "gradient_eigenvectors", "gradient_eigenvalues",
         "lambda")


def token_covariance(x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """``(sum_t x_t x_t^T, tokens)`` over the real tokens of ``x`` [B, T, d] (``valid`` [B, T], 1 = real)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    if valid is not None:
        keep = valid.reshape(-1).bool()
        flat = flat[keep]
    return flat.T @ flat, flat.shape[0]


def eigenbasis(cov_sum: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues [d], eigenvectors [d, d])`` of the mean covariance ``cov_sum / count``, in float64."""
    cov = cov_sum.double() / max(count, 1)
    return torch.linalg.eigh((cov + cov.T) / 2)


def rotate(grad: torch.Tensor, q_out: torch.Tensor, q_in: torch.Tensor) -> torch.Tensor:
    """``Q_S^T G Q_A`` for every row of ``grad`` [B, out, in]: the gradient in the Kronecker eigenbasis."""
    return q_out.T @ grad @ q_in


def unrotate(grad: torch.Tensor, q_out: torch.Tensor, q_in: torch.Tensor) -> torch.Tensor:
    """``Q_S G Q_A^T``: back from the eigenbasis (the inverse of ``rotate``)."""
    return q_out @ grad @ q_in.T


def lambda_update(grad: torch.Tensor, q_out: torch.Tensor, q_in: torch.Tensor) -> torch.Tensor:
    """``sum_b (Q_S^T G_b Q_A)^2`` [out, in] in float64: one batch's part of EK-FAC's ``Lambda``."""
    return rotate(grad, q_out, q_in).double().square().sum(0)


def kfac_eigenvalues(gradient_eigenvalues: torch.Tensor, activation_eigenvalues: torch.Tensor) -> torch.Tensor:
    """``s a^T`` [out, in]: the eigenvalues of ``S (x) A`` laid out like a gradient."""
    return torch.outer(gradient_eigenvalues, activation_eigenvalues)


def inverse_eigenvalues(eigenvalues: torch.Tensor, damping: float) -> torch.Tensor:
    """``1 / (e + damping x mean(e))``: the damped inverse of a layer's eigenvalues."""
    e = eigenvalues.double()
    return 1.0 / (e + damping * e.mean())


def precondition_eigen(grad: torch.Tensor, q_out: torch.Tensor, q_in: torch.Tensor,
                       inverse: torch.Tensor) -> torch.Tensor:
    """``Q_S [(Q_S^T G Q_A) * inverse] Q_A^T`` for every row of ``grad`` [B, out, in]."""
    return unrotate(rotate(grad, q_out, q_in) * inverse.to(grad.dtype), q_out, q_in)


# ----- fitting -----------------------------------------------------------------------------------------
class Covariances:
    """Context manager: sums ``A`` and ``S`` of every layer over the batches run inside it (first pass).

    Usage: ``with Covariances(layers) as cov: cov.step(model, batch)`` per batch; ``cov.sums`` holds
    ``{layer: {"activation": [in, in], "gradient": [out, out]}}`` (float32 sums) and ``cov.tokens`` the
    real tokens they cover. Padding tokens are left out of A (their dy is zero with right padding).
    """

    def __init__(self, layers: dict[str, nn.Linear]):
        self.layers = layers
        self.sums = {n: {"activation": torch.zeros(m.in_features, m.in_features, device=m.weight.device),
                         "gradient": torch.zeros(m.out_features, m.out_features, device=m.weight.device)}
                     for n, m in layers.items()}
        self.tokens = torch.zeros((), dtype=torch.float64, device=next(iter(layers.values())).weight.device)
        self._valid: torch.Tensor | None = None
        self._handles: list = []

    def _hook(self, name: str):
        def forward(module, inputs, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            self.sums[name]["activation"] += token_covariance(inputs[0].detach(), self._valid)[0]

            def backward(grad_out: torch.Tensor) -> None:
                self.sums[name]["gradient"] += token_covariance(grad_out, self._valid)[0]

            output.register_hook(backward)
        return forward

    def __enter__(self) -> Covariances:
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def step(self, model: nn.Module, batch: dict) -> None:
        """One forward and backward of the batch's summed row losses (``-lbar`` per row)."""
        self._valid = batch["attention_mask"]
        self.tokens += batch["attention_mask"].sum()
        backward(model, batch)


def row_losses(model: nn.Module, batch: dict) -> torch.Tensor:
    """``-lbar`` per row [B]: the objective every gradient of the project differentiates."""
    return -row_logprob(model, batch)


def backward(model: nn.Module, batch: dict) -> None:
    """Backpropagate the batch's summed row losses (for the hooks), leaving no parameter gradient behind.

    The model must be in eval mode: with activation checkpointing (train mode) the forward hooks of a
    recomputation would count every token twice.
    """
    with torch.enable_grad():
        row_losses(model, batch).sum().backward()
    model.zero_grad(set_to_none=True)


def eigen_factors(sums: dict[str, dict[str, torch.Tensor]], tokens: float) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer: eigenvalues and eigenvectors of ``A`` and ``S`` (the covariance sums over ``tokens``)."""
    out = {}
    for name, parts in sums.items():
        out[name] = {}
        for side in ("activation", "gradient"):
            values, vectors = eigenbasis(parts[side], int(tokens))
            out[name][f"{side}_eigenvalues"], out[name][f"{side}_eigenvectors"] = values, vectors
    return out


class Lambdas:
    """Context manager: EK-FAC's ``sum_b (Q_S^T G_b Q_A)^2`` per layer over the rows run inside it (second pass).

    Usage: ``with Lambdas(layers, factors) as lam: lam.step(model, batch)``; ``lam.sums`` [out, in] float64
    and ``lam.rows`` the rows they cover.
    """

    def __init__(self, layers: dict[str, nn.Linear], factors: dict[str, dict[str, torch.Tensor]]):
        device = next(iter(layers.values())).weight.device
        self.bases = {n: (f["gradient_eigenvectors"].float().to(device),
                          f["activation_eigenvectors"].float().to(device)) for n, f in factors.items()}
        self.sums = {n: torch.zeros(m.out_features, m.in_features, dtype=torch.float64, device=device)
                     for n, m in layers.items()}
        self.rows = torch.zeros((), dtype=torch.float64, device=device)
        self._grads = PerExampleGradients(layers, self._consume)

    def _consume(self, name: str, grad: torch.Tensor) -> None:
        self.sums[name] += lambda_update(grad, *self.bases[name])

    def __enter__(self) -> Lambdas:
        self._grads.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._grads.__exit__(*exc)

    def step(self, model: nn.Module, batch: dict) -> None:
        self.rows += batch["input_ids"].shape[0]
        backward(model, batch)


def with_lambdas(factors: dict[str, dict[str, torch.Tensor]], sums: dict[str, torch.Tensor],
                 rows: float) -> dict[str, dict[str, torch.Tensor]]:
    """``factors`` with each layer's ``lambda = sums / rows`` added."""
    return {n: dict(f, **{"lambda": sums[n] / max(float(rows), 1.0)}) for n, f in factors.items()}


def fit_factors(model: nn.Module, layers: dict[str, nn.Linear], batches: Iterable[dict]
                ) -> dict[str, dict[str, torch.Tensor]]:
    """K-FAC and EK-FAC factors of ``layers`` from two passes over ``batches`` (a re-iterable; one process).

    The Lightning stage (``modules.curvature``) does the same with sums reduced over processes.
    """
    with Covariances(layers) as cov:
        for batch in batches:
            cov.step(model, batch)
    factors = eigen_factors(cov.sums, float(cov.tokens))
    with Lambdas(layers, factors) as lam:
        for batch in batches:
            lam.step(model, batch)
    return with_lambdas(factors, lam.sums, float(lam.rows))


# ----- the factors of one checkpoint on disk ---------------------------------------------------------
def save_factors(folder: str | Path, factors: dict[str, dict[str, torch.Tensor]], record: dict) -> Path:
    """Write ``{layer: {kind: tensor}}`` to ``folder/curvature.safetensors`` and its record (atomically).

    ``record`` says what they were fitted from (the adapter's sha256, rows, tokens); the file's sha256
    is added, so a store made with these factors can name them.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    flat = {f"{layer}.{kind}": t.detach().float().contiguous().cpu() for layer, kinds in factors.items()
            for kind, t in kinds.items()}
    with atomic_file(folder / FACTORS_FILE) as tmp:
        save_file(flat, str(tmp))
    Manifest(folder / RECORD_FILE, dict(record, format=FORMAT, sha256=file_sha256(folder / FACTORS_FILE))).write()
    return folder / FACTORS_FILE


def factors_record(folder: str | Path) -> Manifest | None:
    """The record of ``folder``'s factors, or None when it has none."""
    folder = Path(folder)
    return Manifest.read(folder / RECORD_FILE) if (folder / FACTORS_FILE).exists() else None


def fitted_for(folder: str | Path, adapter_sha256: str) -> bool:
    """Whether ``folder``'s record says its factors were fitted at the adapter with this sha256."""
    record = factors_record(folder)
    return record is not None and record.get("adapter_sha256") == adapter_sha256 and record.get("format") == FORMAT


FIX = ("run `python -m prism_lightning curvature` with this checkpoint_dir (the pipeline runs it by itself for "
       "kfac/ekfac)")


def check_factors(folder: str | Path, adapter_sha256: str) -> Manifest:
    """The record of ``folder``'s factors, refused unless they were fitted at this adapter and the file's bytes are
    the ones recorded (its sha256 is computed here, not copied from the record)."""
    folder = Path(folder)
    record = factors_record(folder)
    if record is None:
        raise FileNotFoundError(f"{folder}: no {FACTORS_FILE} for the kfac/ekfac preconditioners; {FIX}")
    record.check({"adapter_sha256": adapter_sha256, "format": FORMAT}, what=str(folder / FACTORS_FILE),
                 error=StoreMismatchError, fix=f"they were fitted at another checkpoint: {FIX} with --force true")
    if file_sha256(folder / FACTORS_FILE) != record.get("sha256"):
        raise StoreCorruptError(f"{folder / FACTORS_FILE}: its sha256 differs from {folder / RECORD_FILE} (altered, "
                                f"truncated or copied from another checkpoint); {FIX} with --force true")
    return record


def load_factors(folder: str | Path, adapter_sha256: str, device: torch.device | str = "cpu"
                 ) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: {kind: tensor}}`` of ``folder``'s factors, after ``check_factors``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    check_factors(folder, adapter_sha256)
    flat = load_file(str(folder / FACTORS_FILE), device=str(device))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        layer, kind = key.rsplit(".", 1)
        out.setdefault(layer, {})[kind] = t
    return out
