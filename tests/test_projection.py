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
