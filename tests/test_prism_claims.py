"""PRISM on the tiny model with real features: the sign convention and the first-order claim."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl
from test_features import extract

from prism_lightning import TINY_MODEL
from prism_lightning.config import LoraArgs, ModelArgs, ProjectionArgs, SelectionArgs
from prism_lightning.data import PrismDataModule
from prism_lightning.influence.objective import mean_logprob
from prism_lightning.influence.per_example import lora_linears
from prism_lightning.influence.scoring import direction, preference_weights
from prism_lightning.modeling import build_model
from prism_lightning.select import compute_scores
from prism_lightning.store.feature_store import FeatureStore


@pytest.mark.slow
def test_sign_convention_with_real_features(warmed, small_data, tmp_path):
    pairs = [json.loads(x) for x in small_data["target_pairs"].read_text().splitlines()]
    pool = [{"id": f"{p['id']}-{side}", "prompt": p["prompt"], "completion": p[side], "subtask": p["subtask"]}
            for p in pairs for side in ("chosen", "rejected")]
    data = dict(small_data, pool=write_jsonl(tmp_path / "pool.jsonl", pool))
    dm = extract(warmed, data, tmp_path, projection=ProjectionArgs(kind="sjlt", dim=4096), normalize=True,
                 pool_preconditioner="sgd")
    dm.setup("predict")
    scores, _ = compute_scores(tmp_path / "features", ["prism"], SelectionArgs(), len(dm.pool_rows),
                                  dm.target_rows)
    s = scores["prism"]
    chosen, rejected = s[0::2], s[1::2]
    # each pair's own direction: <u+, pi (u+ - u-)> = pi (1 - cos) > 0 and <u-, .> < 0, exactly
    pool = FeatureStore(tmp_path / "features" / "epoch-2" / "pool").load("features").double()
    target = FeatureStore(tmp_path / "features" / "epoch-2" / "target")
    c, r = target.load("chosen").double(), target.load("rejected").double()
    pi = preference_weights(target.load("lbar_chosen").double(), target.load("lbar_rejected").double())
    for j in range(len(c)):
        d = direction("prism", c[j: j + 1], r[j: j + 1], pi[j: j + 1])
        assert pool[2 * j] @ d > 0 > pool[2 * j + 1] @ d
    # the direction aggregated over all pairs (six skills) keeps the sign for nearly every candidate
    right = torch.cat([chosen > 0, rejected < 0]).double().mean()
    print(f"aggregated prism direction: {right:.0%} of candidates signed as their pair side")
    assert chosen.mean() > 0 > rejected.mean() and right >= 0.9, (chosen, rejected)


@pytest.mark.slow
def test_prism_direction_raises_weighted_margin_more(warmed, small_data, tmp_path):
    """One SGD step of equal length along -g: the pi-weighted margin rises more with prism than uniform."""
    extract(warmed, small_data, tmp_path, splits=["target"], target_preconditioner="identity")
    store = FeatureStore(tmp_path / "features" / "epoch-2" / "target")
    c, r = store.load("chosen").double(), store.load("rejected").double()
    pi = preference_weights(store.load("lbar_chosen").double(), store.load("lbar_rejected").double())
    folder = warmed / "warmup" / "epoch-2"
    dm = PrismDataModule(tokenizer=TINY_MODEL,
                         pool=str(small_data["pool"]), target=str(small_data["target_pairs"]), eval_sft=None,
                         eval_pairs=None, max_length=64)
    dm.setup("predict")
    ds, collate = dm.split_dataset("target")
    batch = collate([ds[i] for i in range(len(ds))])
    n = len(ds)

    def weighted_margin(model) -> float:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            lbar = mean_logprob(logits, batch["labels"]).double()
        return float((pi * (lbar[:n] - lbar[n:])).sum())

    gains = {}
    for mode in ("prism", "prism_uniform"):
        d = direction(mode, c, r, pi)
        step = 0.05 * d / d.norm()
        model = build_model(ModelArgs(), LoraArgs(), adapter_path=folder).eval()
        before = weighted_margin(model)
        with torch.no_grad():
            off = 0
            for _name, layer in sorted(lora_linears(model).items()):
                size = layer.weight.numel()
                layer.weight -= step[off: off + size].view_as(layer.weight).float()
                off += size
        gains[mode] = weighted_margin(model) - before
    print(f"pi-weighted margin gain: prism {gains['prism']:.5f}, uniform {gains['prism_uniform']:.5f}")
    assert gains["prism"] > gains["prism_uniform"] > 0, gains
