"""Projections: JL inner-product preservation, seed determinism, blocked == dense."""

from __future__ import annotations

import pytest
import torch
from conftest import TOL

from prism_lightning.config import ProjectionArgs
from prism_lightning.influence.projection import Projector, dense_rademacher

SIZES = {"layer.b": 300, "layer.a": 500}


def project(args, x):
    proj = Projector(args, SIZES)
    out = proj.new_output(x.shape[0], x.device)
    off = 0
    for name, size in sorted(SIZES.items()):
        proj.add(out, name, x[:, off: off + size])
        off += size
    return out


@pytest.mark.parametrize("kind", ["rademacher", "sjlt"])
def test_inner_products_preserved_better_with_larger_k(kind):
    torch.manual_seed(0)
    x = torch.randn(16, 800)
    exact = x @ x.T
    errors = []
    for k in (64, 512, 4096):
        px = project(ProjectionArgs(kind=kind, dim=k, seed=1), x)
        errors.append(((px @ px.T - exact).norm() / exact.norm()).item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.1, errors


@pytest.mark.parametrize("kind", ["rademacher", "sjlt"])
def test_seed_determinism(kind):
    x = torch.randn(4, 800)
    a = project(ProjectionArgs(kind=kind, dim=128, seed=5), x)
    b = project(ProjectionArgs(kind=kind, dim=128, seed=5, cache_mb=0), x)  # regenerated, not cached
    c = project(ProjectionArgs(kind=kind, dim=128, seed=6), x)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_blocked_equals_dense():
    x = torch.randn(5, 800, dtype=torch.float64).float()
    args = ProjectionArgs(kind="rademacher", dim=64, seed=2, block_rows=128)
    dense = dense_rademacher(args, SIZES)
    assert dense.shape == (800, 64)
    torch.testing.assert_close(project(args, x), x @ dense, **TOL)


def test_none_concatenates_in_name_order():
    x = torch.randn(3, 800)
    torch.testing.assert_close(project(ProjectionArgs(kind="none"), x), x)


def _reference_sign(key: int, n: int) -> int:
    """The documented Rademacher scheme in plain Python integers: the sign of counter ``n`` under ``key``."""
    def h(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    lo, hi = key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF
    return 1 if h(h((n & 0xFFFFFFFF) ^ lo) ^ h((n >> 32) ^ hi)) >> 31 else -1


def test_rademacher_is_the_documented_integer_scheme_whatever_the_blocks():
    """Integer-only generation: equal to a pure-Python reference (so to any device's), rows of any block size."""
    from prism_lightning.influence.projection import module_seed, rademacher_block

    dim, key = 48, module_seed(7, "layer.a")
    block = rademacher_block(7, "layer.a", 2**27 + 5, 3, dim)  # counters n = i k + j beyond 2^32
    want = torch.tensor([[_reference_sign(key, (2**27 + 5 + i) * dim + j) for j in range(dim)] for i in range(3)])
    assert torch.equal(block.sign(), want.float()) and torch.equal(block.abs(), torch.full_like(block, dim**-0.5))
    whole = dense_rademacher(ProjectionArgs(kind="rademacher", dim=dim, seed=7), {"layer.a": 500})
    for rows in (1, 7, 128, 500):
        args = ProjectionArgs(kind="rademacher", dim=dim, seed=7, block_rows=rows, cache_mb=0)
        x = torch.eye(500)
        out = torch.zeros(500, dim)
        Projector(args, {"layer.a": 500}).add(out, "layer.a", x)
        assert torch.equal(out, whole)
    signs = whole.sign()
    assert abs(signs.mean().item()) < 0.02  # balanced
    gram = signs.T @ signs / signs.shape[0]  # columns nearly orthogonal
    assert (gram - torch.eye(dim)).abs().max().item() < 0.25


@pytest.mark.heavy
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: same Rademacher matrix on cuda and cpu")
def test_rademacher_equal_on_cpu_and_gpu():
    from prism_lightning.influence.projection import rademacher_block

    cpu = rademacher_block(3, "m", 100, 4096, 1024)
    assert torch.equal(rademacher_block(3, "m", 100, 4096, 1024, "cuda").cpu(), cpu)
