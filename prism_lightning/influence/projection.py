"""Random projections of per-example gradients, applied module by module.

A gradient ``g`` in R^P (the concatenation of every LoRA module's flattened gradient) is
mapped to ``P^T g`` in R^k with ``E[<P^T x, P^T y>] = <x, y>`` (Johnson-Lindenstrauss). The
projection of the whole gradient is the sum of per-module projections ``sum_m P_m^T g_m``, so
it is computed one module at a time and never needs a ``P x k`` matrix in memory.

- ``none``: no projection; features are the raw gradients concatenated in module-name order.
- ``rademacher``: dense entries ``+-1/sqrt(k)``, generated where the gradient is (GPU or CPU) by a
  counter-based hash: entry (i, j) of module m's matrix is the top bit of
  ``h(h(n_lo ^ key_lo) ^ h(n_hi ^ key_hi))`` with ``n = i k + j``, ``key = module_seed(seed, m)`` and ``h``
  a 32-bit integer hash (``hash32``). Integer arithmetic only, so every device, process and block size
  gives the same matrix, and a GPU never waits for the host to generate it.
- ``sjlt``: sparse sign sketch (Kane & Nelson's sparse JL); each input coordinate is sent to
  ``s`` random buckets with random signs ``+-1/sqrt(s)``: cost O(B * P * s) instead of O(B * P * k).

Generated blocks are cached up to ``cache_mb`` megabytes, beyond that regenerated per batch.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict

import torch

from prism_lightning.config import ProjectionArgs


def projection_identity(args: ProjectionArgs) -> dict:
    """The settings that determine the projected values (the cache budget does not), and for ``rademacher``
    the generation scheme."""
    out = {k: v for k, v in asdict(args).items() if k != "cache_mb"}
    if args.kind == "rademacher":
        out["scheme"] = RADEMACHER_SCHEME
    return out


def module_seed(seed: int, name: str, block: int = 0) -> int:
    """A stable 63-bit seed for (global seed, module name, block); independent of process and device."""
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 65_537 + block) % (2**63 - 1)


MASK32 = 0xFFFFFFFF
RADEMACHER_SCHEME = "hash32-counter-v1"  # in the projection identity: stores made otherwise are refused


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2^32`` for int64 ``x`` in ``[0, 2^32)``, in two 16-bit halves (no int64 overflow)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash with full avalanche (Wellons' lowbias32) on int64 tensors in ``[0, 2^32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def rademacher_block(seed: int, name: str, start: int, rows: int, dim: int, device=None) -> torch.Tensor:
    """Rows ``[start, start + rows)`` of module ``name``'s ``P_m x k`` matrix, entries ``+-1/sqrt(k)``, made on
    ``device`` (see the module docstring for the scheme)."""
    key = module_seed(seed, name)
    key_lo, key_hi = key & MASK32, (key >> 32) & MASK32
    out = torch.empty(rows, dim, device=device)
    cols = torch.arange(dim, device=device, dtype=torch.int64)
    step = max(1, 2**22 // dim)  # int64 temporaries of at most 32 MiB
    for lo in range(0, rows, step):
        n = (torch.arange(start + lo, start + min(lo + step, rows), device=device, dtype=torch.int64)
             .unsqueeze(1) * dim + cols)
        # every counter below 2^32: the high word is 0 throughout, so its hash is one number
        n_hi = n >> 32 if (start + rows) * dim > 2**32 else n.new_zeros(1, 1)
        h = hash32(hash32((n & MASK32) ^ key_lo) ^ hash32(n_hi ^ key_hi))
        out[lo:lo + step] = ((h >> 31).float() * 2 - 1) / dim**0.5
    return out


def sjlt_map(seed: int, name: str, n_in: int, dim: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket indices [n_in, s] in ``[0, k)`` and signs [n_in, s] in ``+-1/sqrt(s)`` for one module."""
    gen = torch.Generator().manual_seed(module_seed(seed, name))
    idx = torch.randint(0, dim, (n_in, s), generator=gen)
    signs = (torch.randint(0, 2, (n_in, s), generator=gen).float() * 2 - 1) / s**0.5
    return idx, signs


class Projector:
    """Accumulates ``sum_m P_m^T g_m`` for a batch; ``add(name, g)`` takes g [B, P_m] (fp32)."""

    def __init__(self, args: ProjectionArgs, sizes: dict[str, int]):
        if args.kind not in ("none", "rademacher", "sjlt"):
            raise ValueError(f"projection.kind={args.kind!r} must be none, rademacher or sjlt")
        self.args, self.sizes = args, dict(sorted(sizes.items()))
        self.offsets, total = {}, 0
        for name, size in self.sizes.items():
            self.offsets[name] = total
            total += size
        self.total = total
        self.dim = total if args.kind == "none" else args.dim
        self._cache: dict = {}
        self._cached_bytes = 0

    def _cached(self, key, make):
        if key in self._cache:
            return self._cache[key]
        value = make()
        nbytes = sum(t.numel() * t.element_size() for t in (value if isinstance(value, tuple) else (value,)))
        if self._cached_bytes + nbytes <= self.args.cache_mb * 2**20:
            self._cache[key] = value
            self._cached_bytes += nbytes
        return value

    def add(self, out: torch.Tensor, name: str, grad: torch.Tensor) -> None:
        """``out[B, k] += P_name^T grad[B, P_name]`` (in place)."""
        a = self.args
        if a.kind == "none":
            off = self.offsets[name]
            out[:, off: off + grad.shape[1]] += grad
            return
        dev = grad.device
        if a.kind == "sjlt":
            idx, signs = self._cached(("sjlt", name, dev), lambda: tuple(
                t.to(dev) for t in sjlt_map(a.seed, name, grad.shape[1], a.dim, a.sjlt_s)))
            vals = (grad.unsqueeze(-1) * signs).reshape(grad.shape[0], -1)
            out.index_add_(1, idx.reshape(-1), vals)
            return
        for block, start in enumerate(range(0, grad.shape[1], a.block_rows)):
            stop = min(start + a.block_rows, grad.shape[1])
            mat = self._cached(("rad", name, block, dev), lambda first=start, n=stop - start: rademacher_block(
                a.seed, name, first, n, a.dim, dev))
            out.addmm_(grad[:, start:stop], mat)

    def new_output(self, batch: int, device) -> torch.Tensor:
        return torch.zeros(batch, self.dim, device=device, dtype=torch.float32)


def dense_rademacher(args: ProjectionArgs, sizes: dict[str, int]) -> torch.Tensor:
    """The full ``P x k`` Rademacher matrix in module-name order (tests and small models only)."""
    blocks = []
    for name, size in sorted(sizes.items()):
        blocks.append(rademacher_block(args.seed, name, 0, size, args.dim))
    return torch.cat(blocks)
