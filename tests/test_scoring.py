"""Scores vs a direct float64 double loop for every mode; chunking, lr weights, selection arithmetic."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import TOL

from prism_lightning.config import SelectionArgs
from prism_lightning.data.formats import PairRow, PoolIndex, SFTRow, rows_digest
from prism_lightning.errors import StoreMismatchError
from prism_lightning.influence.scoring import MODES
from prism_lightning.influence.selection import budget, choose, rank_order, ranks
from prism_lightning.select import compute_scores, run_selection
from prism_lightning.store.feature_store import mark_complete, write_shard

N, M, K = 37, 9, 16
SUBS = ["a", "b", "a", "c", "b", "a", "c", "c", "a"]


def fake_stores(root, epochs=(1, 2), lrs=(2e-3, 1e-3), shard=10, seed=0, pool=None):
    """Random stores at ``epochs``, recording the digests of ``rows()`` (or of ``pool``) as their source."""
    g = torch.Generator().manual_seed(seed)
    data = {}
    sources = {"pool": rows_digest(pool or rows()[0]), "target": rows_digest(rows()[1])}
    for e, lr in zip(epochs, lrs):
        f = torch.randn(N, K, generator=g)
        c, r = torch.randn(M, K, generator=g), torch.randn(M, K, generator=g)
        lc, lr_ = -torch.rand(M, generator=g) * 3, -torch.rand(M, generator=g) * 3
        loss = torch.rand(N, generator=g)
        base = {"format": 1, "model": "m", "projection": {"kind": "none"}, "normalize": False, "dim": K,
                "epoch": e, "lr_mean": lr, "adapter_sha256": f"h{e}", "adapter_path": f"ck{e}"}
        for split, n in (("pool", N), ("target", M)):
            folder = root / f"epoch-{e}" / split
            starts = range(0, n, shard)
            for j, s in enumerate(starts):
                idx = torch.arange(s, min(s + shard, n))
                t = ({"features": f[idx], "loss": loss[idx]} if split == "pool" else
                     {"chosen": c[idx], "rejected": r[idx], "lbar_chosen": lc[idx], "lbar_rejected": lr_[idx]})
                write_shard(folder, j, t | {"index": idx})
            mark_complete(folder, base | {"split": split, "rows": n, "source_sha256": sources[split],
                                          "shard_size": shard}, len(starts))
        data[e] = (lr, f.double(), c.double(), r.double(), lc.double(), lr_.double(), loss.double())
    return data


def rows():
    pool = [SFTRow(f"r{i:02d}", "p", "c", "x") for i in range(N)]
    targets = [PairRow(f"t{j}", "q", "y", "n", SUBS[j]) for j in range(M)]
    return pool, targets


def direct(mode, data, per_subtask=False):
    """The docs/method.md formulas as explicit loops over candidates and pairs."""
    out = torch.zeros(N, dtype=torch.float64)
    groups = sorted(set(SUBS)) if (per_subtask or mode == "less") else ["*"]
    per_group = {g: torch.zeros(N, dtype=torch.float64) for g in groups}
    for lr, f, c, r, lc, lrj, _ in data.values():
        for g in groups:
            qs = [q for q in range(M) if g == "*" or SUBS[q] == g]
            for i in range(N):
                s = 0.0
                if mode == "ifguide":
                    mc = sum(c[q] for q in qs) / len(qs)
                    mr = sum(r[q] for q in qs) / len(qs)
                    s = float(f[i] @ (mc / mc.norm() - mr / mr.norm()))
                else:
                    for q in qs:
                        pi = 1 / (1 + math.exp(-(lc[q] - lrj[q])))
                        if mode == "prism":
                            s += pi * float(f[i] @ (c[q] - r[q]))
                        elif mode == "prism_uniform":
                            s += float(f[i] @ (c[q] - r[q]))
                        elif mode == "prism_no_anchor":
                            s += pi * float(f[i] @ c[q])
                        elif mode == "less":
                            s += float(f[i] @ c[q] / (f[i].norm() * c[q].norm()))
                    s /= len(qs)
                per_group[g][i] += lr * s
    for i in range(N):
        out[i] = max(per_group[g][i] for g in groups)
    return out


@pytest.mark.parametrize("mode", ["prism", "prism_uniform", "prism_no_anchor", "less", "ifguide"])
@pytest.mark.parametrize("per_subtask", [False, True])
def test_scores_equal_double_loop(tmp_path, mode, per_subtask):
    data = fake_stores(tmp_path)
    pool, targets = rows()
    args = SelectionArgs(per_subtask_direction=per_subtask, chunk_rows=7)
    scores, weights = compute_scores(tmp_path, [mode], args, len(pool), targets)
    torch.testing.assert_close(scores[mode], direct(mode, data, per_subtask), **TOL)
    lr, _, _, _, lc, lrj, _ = data[1]
    torch.testing.assert_close(weights["epoch-1"], torch.sigmoid(lc - lrj), **TOL)


def test_loss_and_random_modes(tmp_path):
    data = fake_stores(tmp_path)
    pool, targets = rows()
    scores, _ = compute_scores(tmp_path, ["loss", "random"], SelectionArgs(seed=3), len(pool), targets)
    want = -sum(lr * loss for lr, *_, loss in data.values())
    torch.testing.assert_close(scores["loss"], want, **TOL)
    again, _ = compute_scores(tmp_path, ["random"], SelectionArgs(seed=3), len(pool), targets)
    assert torch.equal(scores["random"], again["random"])


def test_chunked_equals_one_shot_and_lr_weighting(tmp_path):
    fake_stores(tmp_path / "x")
    pool, targets = rows()
    one, _ = compute_scores(tmp_path / "x", list(MODES), SelectionArgs(chunk_rows=10_000), len(pool), targets)
    many, _ = compute_scores(tmp_path / "x", list(MODES), SelectionArgs(chunk_rows=3), len(pool), targets)
    for m in MODES:
        torch.testing.assert_close(one[m], many[m], **TOL)
    # lr weighting: scores from both epochs = lr1 * s(epoch 1) + lr2 * s(epoch 2)
    e1, _ = compute_scores(tmp_path / "x", ["prism"], SelectionArgs(epochs=[1]), len(pool), targets)
    e2, _ = compute_scores(tmp_path / "x", ["prism"], SelectionArgs(epochs=[2]), len(pool), targets)
    torch.testing.assert_close(one["prism"], e1["prism"] + e2["prism"], **TOL)
    fake_stores(tmp_path / "y", lrs=(1.0, 0.0))
    only_first, _ = compute_scores(tmp_path / "y", ["prism"], SelectionArgs(), len(pool), targets)
    first, _ = compute_scores(tmp_path / "y", ["prism"], SelectionArgs(epochs=[1]), len(pool), targets)
    torch.testing.assert_close(only_first["prism"], first["prism"], **TOL)


@pytest.mark.parametrize("mode", ["prism", "prism_uniform", "prism_no_anchor", "less", "ifguide"])
def test_target_checkpoint_last_scores_every_checkpoint_against_the_last_target_side(tmp_path, mode):
    """``target_checkpoint: last``: each checkpoint's pool features meet the last checkpoint's targets and pi."""
    data = fake_stores(tmp_path / "features")
    shutil.rmtree(tmp_path / "features" / "epoch-1" / "target")  # not needed, so never extracted
    pool, targets = rows()
    args = SelectionArgs(target_checkpoint="last", chunk_rows=7)
    scores, weights = compute_scores(tmp_path / "features", [mode], args, len(pool), targets)
    last = data[2]
    moved = {e: (lr, f, *last[2:6], loss) for e, (lr, f, *_, loss) in data.items()}
    torch.testing.assert_close(scores[mode], direct(mode, moved), **TOL)
    assert not torch.allclose(scores[mode], direct(mode, data), **TOL)  # it is another score than "each"
    torch.testing.assert_close(weights["epoch-1"], torch.sigmoid(last[4] - last[5]), **TOL)
    torch.testing.assert_close(weights["epoch-2"], weights["epoch-1"], **TOL)
    summary = run_selection(tmp_path / "features", tmp_path / "sel", [mode], args, PoolIndex.from_rows(pool),
                            targets)
    top = set(scores[mode].argsort(descending=True)[:budget(N, args.fraction, args.k)].tolist())
    assert set(summary[mode]["keep"].nonzero().flatten().tolist()) == top
    recorded = json.loads((tmp_path / "sel" / mode / "manifest.json").read_text())
    assert recorded["selection"]["target_checkpoint"] == "last"
    assert {s["epoch"] for s in recorded["stores"] if s["split"] == "target"} == {2}
    with pytest.raises(FileNotFoundError, match=r"no target store at epoch-1 \(target stores at: epoch-2\).*"
                                                "selection.target_checkpoint: last"):  # "each" needs every one
        compute_scores(tmp_path / "features", [mode], SelectionArgs(), len(pool), targets)
    with pytest.raises(FileNotFoundError, match="no target store at epoch-1"):  # the last of [1] is epoch 1
        compute_scores(tmp_path / "features", [mode], SelectionArgs(epochs=[1], target_checkpoint="last"),
                       len(pool), targets)


def test_store_mismatch_refused(tmp_path):
    fake_stores(tmp_path / "features")
    pool, targets = rows()
    index = PoolIndex.from_rows(pool)
    with pytest.raises(StoreMismatchError, match="projection.kind: recorded 'none', now 'sjlt'"):
        run_selection(tmp_path / "features", tmp_path / "sel", ["prism"], SelectionArgs(), index, targets,
                      explicit={"projection": {"kind": "sjlt"}})
    with pytest.raises(StoreMismatchError, match="source_sha256"):
        run_selection(tmp_path / "features", tmp_path / "sel", ["prism"], SelectionArgs(fraction=None, k=1),
                      PoolIndex.from_rows(pool[:5]), targets)
    with pytest.raises(StoreMismatchError, match="another pool"):
        compute_scores(tmp_path / "features", ["prism"], SelectionArgs(), 5, targets)


def test_budget_arithmetic():
    assert budget(100, 0.05, None) == 5 and budget(960, 0.05, None) == 48 and budget(10, None, 3) == 3
    with pytest.raises(ValueError, match="0 rows"):
        budget(10, 0.05, None)
    with pytest.raises(ValueError, match="exactly one"):
        budget(10, 0.5, 2)


def test_choose_forward_repair_ties_and_quota():
    scores = torch.tensor([1.0, 3.0, 3.0, -2.0, 0.0, -5.0])
    fwd = choose(scores, "forward", k=2)
    assert fwd.tolist() == [False, True, True, False, False, False]
    tie = choose(scores, "forward", k=1)  # tie at 3.0 broken by row order: row 1 wins
    assert tie.tolist() == [False, True, False, False, False, False]
    rep = choose(scores, "repair", k=2)
    assert rep.tolist() == [True, True, True, False, True, False]
    subs = torch.tensor([0, 0, 1, 1, 1, 1])
    quota = choose(scores, "forward", k=3, subtasks=subs)
    assert quota.sum() == 3 and quota[[0, 1]].sum() == 1  # 1 of 2 rows of subtask 0, 2 of 4 of subtask 1
    assert ranks(rank_order(scores)).tolist() == [3, 1, 2, 5, 4, 6]


def test_run_selection_writes_files_and_metrics(tmp_path):
    pool, targets = rows()
    for i, r in enumerate(pool):
        r.extra["harmful"] = i % 5 == 0 and i < 20
        r.subtask = "bad" if i < 20 else "good"
    fake_stores(tmp_path / "features", pool=pool)
    args = SelectionArgs(task="repair", fraction=0.2)
    index = PoolIndex.from_rows(pool, label="harmful")
    summary = run_selection(tmp_path / "features", tmp_path / "sel", "prism,less,loss,random", args, index, targets)
    for mode in ("prism", "less", "loss", "random"):
        d = tmp_path / "sel" / mode
        scores = [json.loads(x) for x in (d / "scores.jsonl").read_text().splitlines()]
        assert len(scores) == N and sorted(s["rank"] for s in scores) == list(range(1, N + 1))
        kept = [json.loads(x) for x in (d / "selected.jsonl").read_text().splitlines()]
        assert len(kept) == N - 7 == sum(s["selected"] for s in scores)
        worst = sorted(scores, key=lambda s: s["rank"])[-7:]
        assert not any(s["selected"] for s in worst)
        assert json.loads((d / "manifest.json").read_text())["mode"] == mode
        assert summary[mode]["selected_rows"] == N - 7
    metrics = json.loads((tmp_path / "sel" / "ranking_metrics.json").read_text())
    assert metrics["contaminated_subtasks"] == ["bad"]
    for mode in ("prism", "less"):
        for view in ("whole_pool", "within_subtask"):
            assert 0 <= metrics["modes"][mode][view]["auroc"] <= 1
    assert metrics["modes"]["prism"]["within_subtask"]["rows"] == 20
    assert (tmp_path / "sel" / "roc.png").stat().st_size > 1000
    with pytest.raises(StoreMismatchError, match="selection.task: recorded 'repair', now 'forward'"):
        run_selection(tmp_path / "features", tmp_path / "sel", "prism", SelectionArgs(task="forward", fraction=0.2),
                      index, targets)


def test_auroc_equals_the_pairwise_count():
    """The reported AUROC (torchmetrics, rates in float64) is P(score+ > score-) + P(tie) / 2, to 1e-12."""
    from prism_lightning.eval.ranking import auroc

    g = torch.Generator().manual_seed(0)
    for scores in (torch.randint(0, 6, (200,), generator=g).double(), torch.randn(300, generator=g).double()):
        labels = torch.rand(len(scores), generator=g) < 0.3
        pos, neg = scores[labels], scores[~labels]
        pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
        assert auroc(scores, labels) == pytest.approx(float(pairs.mean()), abs=1e-12)
    assert torch.get_default_dtype() == torch.float32  # restored


@pytest.mark.parametrize("mode", ["prism", "prism_uniform", "prism_no_anchor", "less", "ifguide"])
@pytest.mark.parametrize("per_subtask", [False, True])
def test_explanations_split_each_score_exactly_over_the_target_pairs(tmp_path, mode, per_subtask):
    data = fake_stores(tmp_path / "features", shard=6)
    pool, targets = rows()
    args = SelectionArgs(per_subtask_direction=per_subtask, fraction=0.2, explain=4, explain_pairs=3, chunk_rows=5)
    run_selection(tmp_path / "features", tmp_path / "sel", [mode], args, PoolIndex.from_rows(pool), targets)
    records = [json.loads(x) for x in (tmp_path / "sel" / mode / "explain.jsonl").read_text().splitlines()]
    want = direct(mode, data, per_subtask)
    assert [r["rank"] for r in records] == [1, 2, 3, 4, N - 3, N - 2, N - 1, N]
    for r in records:
        assert r["id"] == pool[r["row"]].id and r["score"] == pytest.approx(float(want[r["row"]]), rel=1e-4)
        by_subtask = sum(v["contribution"] for v in r["by_subtask"].values())
        assert by_subtask == pytest.approx(r["score"], rel=1e-9, abs=1e-12)
        assert sum(p["contribution"] for p in r["pairs"]) + r["other_pairs"] == pytest.approx(r["score"], rel=1e-9)
        assert sum(v["share"] for v in r["by_subtask"].values()) == pytest.approx(1.0, rel=1e-9)
        assert len(r["pairs"]) == 3 and abs(r["pairs"][0]["contribution"]) >= abs(r["pairs"][-1]["contribution"])
        if mode == "prism" and not per_subtask:  # each pair's part is its term of the direct formula
            i = r["row"]
            for p in r["pairs"]:
                q = next(j for j, t in enumerate(targets) if t.id == p["id"])
                term = sum(lr * float(torch.sigmoid(lc[q] - lrj[q])) * float(f[i] @ (c[q] - rr[q])) / M
                           for lr, f, c, rr, lc, lrj, _ in data.values())
                assert p["contribution"] == pytest.approx(term, rel=1e-6)
        if per_subtask or mode == "less":  # only the winning subtask's pairs count
            assert sum(1 for v in r["by_subtask"].values() if v["contribution"] != 0) == 1


def test_no_explanations_for_modes_without_gradients_or_explain_zero(tmp_path):
    fake_stores(tmp_path / "features")
    pool, targets = rows()
    run_selection(tmp_path / "features", tmp_path / "sel", ["prism", "loss", "random"],
                  SelectionArgs(explain=0), PoolIndex.from_rows(pool), targets)
    assert not list((tmp_path / "sel").glob("*/explain.jsonl"))
    run_selection(tmp_path / "features", tmp_path / "sel", ["prism", "loss", "random"],
                  SelectionArgs(explain=30), PoolIndex.from_rows(pool), targets)  # more than half the pool
    records = (tmp_path / "sel" / "prism" / "explain.jsonl").read_text().splitlines()
    assert len(records) == N and not (tmp_path / "sel" / "loss" / "explain.jsonl").exists()


def test_store_rows_reads_any_rows_in_the_order_asked(tmp_path):
    from prism_lightning.store.feature_store import FeatureStore

    data = fake_stores(tmp_path, shard=4)
    store = FeatureStore(tmp_path / "epoch-1" / "pool")
    picks = [36, 0, 5, 4, 17, 5]
    torch.testing.assert_close(store.rows("features", picks).double(), data[1][1][picks])
    with pytest.raises(IndexError):
        store.rows("features", [N])


def test_top_explained_gives_the_most_harmful_or_the_top_selected_rows(tmp_path):
    from prism_lightning.select import top_explained

    fake_stores(tmp_path / "features")
    pool, targets = rows()
    run_selection(tmp_path / "features", tmp_path / "sel", ["prism"], SelectionArgs(explain=12),
                  PoolIndex.from_rows(pool), targets)
    repair = top_explained(tmp_path / "sel", "repair")
    forward = top_explained(tmp_path / "sel", "forward", n=3)
    assert [r["rank"] for r in repair] == list(range(N, N - 10, -1))
    assert [r["rank"] for r in forward] == [1, 2, 3]
    assert all(r["pair"] in {t.id for t in targets} and r["mode"] == "prism" for r in repair + forward)
    assert top_explained(tmp_path / "sel", "repair", mode="less") == []  # no such file: nothing to show
