"""The first-order study's measurements (prism_lightning/eval/first_order.py) against finite differences."""

from __future__ import annotations

import pytest
import torch

from prism_lightning import DEMO_DATA, TINY_MODEL
from prism_lightning.config import LoraArgs, ModelArgs
from prism_lightning.data.datamodule import PrismDataModule
from prism_lightning.eval import first_order as F
from prism_lightning.influence.scoring import direction
from prism_lightning.modeling import build_model


@pytest.fixture(scope="module")
def setting():
    """The tiny model in float64 with a random (not zero-initialised) adapter, 6 target and 8 held-out pairs."""
    torch.manual_seed(0)
    model = build_model(ModelArgs(), LoraArgs(r=4, alpha=8, dropout=0.0)).double().eval()
    with torch.no_grad():
        for p in F.lora_parameters(model):
            p.normal_(0, 0.05)
    dm = PrismDataModule(tokenizer=TINY_MODEL, pool=f"{DEMO_DATA}/pool.jsonl", target=f"{DEMO_DATA}/target_pairs.jsonl",
                         eval_sft=None, eval_pairs=f"{DEMO_DATA}/eval_pairs.jsonl", max_length=64)
    dm.load()
    pad = dm.tok.pad_token_id
    target = tuple([side[i] for i in range(6)] for side in dm.target_encoded)
    held = tuple([side[i] for i in range(8)] for side in dm.eval_pair_encoded)
    return model, target, held, pad, [dm.pool_encoded[i] for i in range(8)]


def test_slope_is_the_derivative_of_the_held_out_margin(setting):
    model, target, held, pad, _ = setting
    c, r, pi = F.pair_gradients(model, *target, pad)
    d = direction("prism", c, r, pi)
    h = 1e-2  # lbar is computed in float32: a smaller step drowns in rounding
    plus, minus = (F.step_gain(model, held, d, s, pad) for s in (h, -h))
    assert F.slope(model, held, d, pad) == pytest.approx((plus - minus) / (2 * h), rel=1e-3)


def test_pair_gradients_are_each_rows_own(setting):
    """Row q's gradient equals the gradient of its loss alone; pi is sigmoid of its margin."""
    model, target, _, pad, _ = setting
    c, r, pi = F.pair_gradients(model, *target, pad)
    params = F.lora_parameters(model)
    q = 3
    lbar = F.row_lbar(model, [target[0][q]], pad)
    torch.testing.assert_close(c[q], F.flat_grad(-lbar[0], params))
    lbar_r = F.row_lbar(model, [target[1][q]], pad)
    torch.testing.assert_close(r[q], F.flat_grad(-lbar_r[0], params))
    assert float(pi[q]) == pytest.approx(float(torch.sigmoid(lbar[0] - lbar_r[0])))


def test_measurements_leave_the_model_as_they_found_it(setting):
    model, target, held, pad, rows = setting
    before = [p.detach().clone() for p in F.lora_parameters(model)]
    c, r, pi = F.pair_gradients(model, *target, pad)
    d = direction("prism_uniform", c, r, pi)
    F.step_gain(model, held, d, 0.1, pad)
    gain = F.train_gain(model, rows, held, pad, lr=0.01, batch_size=4)
    assert gain != 0.0  # it trained
    for p, b in zip(F.lora_parameters(model), before):
        assert torch.equal(p, b)
