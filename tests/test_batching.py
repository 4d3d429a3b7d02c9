"""Length-aware batching: token-budget feature batches and length-grouped training steps."""

from __future__ import annotations

import random

import lightning as L
import pytest
import torch
from conftest import TOL

from prism_lightning import TINY_MODEL
from prism_lightning.config import ProjectionArgs
from prism_lightning.data import PrismDataModule
from prism_lightning.data.samplers import GlobalBatchSampler, token_batches
from prism_lightning.modules import GradientFeatureModule
from prism_lightning.store.feature_store import FeatureStore


def test_token_batches_cover_every_row_within_the_budget():
    rng = random.Random(0)
    rows = list(range(100, 300))
    lengths = [int(rng.lognormvariate(3, 1)) + 1 for _ in rows]
    batches = token_batches(rows, lengths, max_rows=16, max_tokens=200, rows_per_item=2)
    assert sorted(i for b in batches for i in b) == rows
    length = dict(zip(rows, lengths))
    for b in batches:
        widest = max(length[i] for i in b)
        assert len(b) <= 16
        assert len(b) == 1 or len(b) * 2 * widest <= 200  # an item over the budget goes alone
        assert length[b[0]] == widest  # longest first
    assert any(len(b) == 1 and 2 * length[b[0]] > 200 for b in batches)
    # without a binding budget the batches are max_rows long, sorted by length (ties in row order)
    flat = [i for b in token_batches(rows, lengths, 16, 10**9) for i in b]
    assert flat == sorted(rows, key=lambda i: (-length[i], i))


def _steps(sampler: GlobalBatchSampler, batch: int) -> list[list[int]]:
    rows = list(sampler)
    return [rows[s:s + batch] for s in range(0, len(rows), batch)]


def test_length_grouped_training_order():
    rng = random.Random(1)
    n, batch, world = 203, 4, 2
    lengths = [int(rng.lognormvariate(4, 1)) + 1 for _ in range(n)]
    one = GlobalBatchSampler(n, batch * world, seed=5, lengths=lengths, group_size=4)
    ranks = [GlobalBatchSampler(n, batch, world, r, seed=5, lengths=lengths, group_size=4) for r in range(world)]
    for s in [one, *ranks]:
        s.set_epoch(1)
    single = _steps(one, batch * world)
    per_rank = [_steps(s, batch) for s in ranks]
    assert sorted(i for b in single for i in b) == list(range(n))  # each row once per epoch
    assert all(len(b) == batch * world for b in single[:-1])
    for step, rows in enumerate(single):  # W processes with batch B see the global batches of one with W x B
        got = [i for r in per_rank for i in r[step]]
        assert got[:len(rows)] == rows
    assert max(lengths[i] for i in single[0]) == max(lengths)  # the longest row comes first
    padded = sum(len(b) * max(lengths[i] for i in b) for b in single)
    plain = GlobalBatchSampler(n, batch * world, seed=5)
    plain.set_epoch(1)
    assert padded < 0.7 * sum(len(b) * max(lengths[i] for i in b) for b in _steps(plain, batch * world))
    again = GlobalBatchSampler(n, batch * world, seed=5, lengths=lengths, group_size=4)
    again.set_epoch(1)
    assert _steps(again, batch * world) == single  # seeded
    again.set_epoch(2)
    assert _steps(again, batch * world) != single  # reshuffled each epoch


def _extract(warmed, data, out, **data_kw):
    dm = PrismDataModule(tokenizer=TINY_MODEL,
                         pool=str(data["pool"]), target=str(data["target_pairs"]), eval_sft=None, eval_pairs=None,
                         shard_size=16, max_length=64, **data_kw)
    module = GradientFeatureModule(checkpoint_dir=str(warmed / "warmup"), output_dir=str(out), epochs=[2],
                                   projection=ProjectionArgs(kind="sjlt", dim=256, seed=1))
    trainer = L.Trainer(accelerator="cpu", inference_mode=False, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.predict(module, datamodule=dm, return_predictions=False)
    return dm


@pytest.mark.slow
@pytest.mark.parametrize("padding_free", [False, True])
def test_length_bucketed_features_equal_padded(warmed, small_data, tmp_path, padding_free):
    """Length-aware batches, and the same packed without padding (``padding_free``), give the padded store."""
    dm = _extract(warmed, small_data, tmp_path / "bucketed", eval_batch_size=16, max_tokens_per_batch=96,
                  padding_free=padding_free)
    _extract(warmed, small_data, tmp_path / "padded", eval_batch_size=8)
    loaded = list(dm.predict_dataloader()[0])
    assert all(("position_ids" in b) == padding_free and ("attention_mask" in b) != padding_free for b in loaded)
    batches = [b["index"].tolist() for b in loaded]
    assert sorted(i for b in batches for i in b) == list(range(len(dm.pool_rows)))
    assert any(b != sorted(b) for b in batches) and len({len(b) for b in batches}) > 1  # really re-batched
    for split, keys in (("pool", ("features", "loss")), ("target", ("chosen", "rejected", "lbar_chosen"))):
        a = FeatureStore(tmp_path / "bucketed" / "features" / "epoch-2" / split)
        b = FeatureStore(tmp_path / "padded" / "features" / "epoch-2" / split)
        assert a.load("index").tolist() == b.load("index").tolist() == list(range(len(a.load("index"))))
        for key in keys:
            torch.testing.assert_close(a.load(key), b.load(key), **TOL)


def test_batching_settings_reach_the_loaders(small_data):
    dm = PrismDataModule(tokenizer=TINY_MODEL,
                         pool=str(small_data["pool"]), target=str(small_data["target_pairs"]), eval_sft=None,
                         eval_pairs=None, train_on="pool", max_length=64, batch_size=4, eval_batch_size=32,
                         shard_size=64, group_by_length=True, length_group_size=2, max_tokens_per_batch=100)
    sampler = dm.train_dataloader().sampler
    assert sampler.lengths == dm.pool_encoded.lengths() and sampler.group_size == 2
    pool_loader, target_loader = dm.predict_dataloader()
    for loader, per_item in ((pool_loader, 1), (target_loader, 2)):
        for batch in loader:
            rows, width = batch["input_ids"].shape
            assert rows == 1 or rows * width <= 100
            assert rows // per_item <= 32


def test_a_budget_below_max_length_is_refused():
    with pytest.raises(ValueError, match="data: max_tokens_per_batch=32 must be at least max_length=64"):
        PrismDataModule(max_length=64, max_tokens_per_batch=32)
