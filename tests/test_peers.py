"""Agreement with the peer attribution libraries where the maths is the same (workload S).

Runs ``tools/bench/bench_peers/run.py`` cases in the peers' virtualenv (``bash tools/bench/bench_peers/setup.sh``)
and compares their ``target x pool`` score matrices: our exact per-example gradients (``identity``,
no projection) against kronfluence's ``identity`` pairwise scores, dattri-llm's TracIn and Bergson's
unprojected index, which are the same gradient dot products; and our Adam features (no projection,
unit-normalised) against dattri-llm's LESS attributor (the cosine of a query gradient with the
Adam update direction of a pool row, at a late step where Adam's bias correction is 1); our K-FAC and
EK-FAC influence (factors fitted on the pool, damping 0.1 x the mean eigenvalue) against kronfluence's
``kfac``/``ekfac`` strategies with the same factors and damping. Skipped,
with the reason, when that virtualenv is absent. Our Adam features are also checked against an
independent Adam computation in this process.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from conftest import REPO, TOL

VENV_PYTHON = REPO / ".venv-peers" / "bin" / "python"
RUNNER = REPO / "tools" / "bench" / "bench_peers" / "run.py"
needs_peers = pytest.mark.skipif(not VENV_PYTHON.exists(),
                                 reason="no peers' virtualenv: run `bash tools/bench/bench_peers/setup.sh` first")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.flatten().argsort().argsort().double() for x in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


@pytest.fixture(scope="module")
def scores(tmp_path_factory) -> Callable[[str], torch.Tensor]:
    folder = tmp_path_factory.mktemp("peer-scores")

    def get(case: str) -> torch.Tensor:
        path = folder / f"S-{case.replace(':', '_')}.pt"
        if not path.exists():
            out = subprocess.run([str(VENV_PYTHON), str(RUNNER), "--case", case, "--workload", "S", "--save",
                                  str(folder)], cwd=REPO, capture_output=True, text=True, timeout=1200)
            assert out.returncode == 0, out.stderr[-3000:]
        return torch.load(path)

    return get


@needs_peers
@pytest.mark.slow
@pytest.mark.parametrize(("case", "peer"), [
    ("ours:identity", "kronfluence:identity"),  # plain gradient dot products
    ("ours:identity", "dattri-llm:tracin"),
    ("ours:identity", "bergson:build+query-0"),  # Bergson's index without projection
    ("ours:adam+none", "dattri-llm:less"),  # cos(target gradient, Adam update of the pool row), as LESS
    ("ours:ekfac+none", "kronfluence:ekfac"),  # influence with EK-FAC fitted on the pool, damping 0.1 x mean
    ("ours:kfac+none", "kronfluence:kfac"),  # the same with K-FAC
])
def test_scores_agree_with_peer_where_the_maths_is_the_same(scores, case, peer):
    ours, theirs = scores(case), scores(peer)
    assert ours.shape == theirs.shape == (32, 512)
    assert pearson(ours, theirs) >= 0.999 and spearman(ours, theirs) >= 0.999
    scale = ours.abs().max()
    torch.testing.assert_close(theirs / scale, ours / scale, **TOL)


@pytest.mark.slow
def test_adam_features_match_an_independent_adam_computation():
    """Our ``adam`` pool features (no projection) vs a batch-size-1 loop with Adam's update written out."""
    sys.path.insert(0, str(RUNNER.parent))
    import run

    from prism_lightning.config import ProjectionArgs
    from prism_lightning.influence.extract import gradient_features
    from prism_lightning.influence.per_example import lora_linears
    from prism_lightning.influence.preconditioners import Adam
    from prism_lightning.influence.projection import Projector

    model, pool, _, _ = run.build("S")
    rows = {k: v[:6] for k, v in pool.items()}
    layers = lora_linears(model)
    moments = run.adam_moments(layers)
    projector = Projector(ProjectionArgs(kind="none", dim=0), {n: m.weight.numel() for n, m in layers.items()})
    ours, _ = gradient_features(model, layers, rows, projector, Adam.from_moments(moments, 0.9, 0.999, 1e-8),
                                normalize=False)
    names = sorted(layers)
    want = []
    for i in range(6):
        loss = run.row_losses(model, {k: v[i: i + 1] for k, v in rows.items()}).sum()
        grads = torch.autograd.grad(loss, [layers[n].weight for n in names])
        parts = []
        for n, g in zip(names, grads):
            m, v = moments[n]  # weight-shaped, like g
            m1 = 0.9 * m + 0.1 * g
            v1 = 0.999 * v + 0.001 * g ** 2
            parts.append((m1 / (v1.sqrt() + 1e-8)).flatten())
        want.append(torch.cat(parts))
    torch.testing.assert_close(ours, torch.stack(want), **TOL)
