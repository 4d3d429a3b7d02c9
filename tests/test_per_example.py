"""Per-example gradients from one batched backward equal a batch-size-1 autograd loop."""

from __future__ import annotations

import pytest
import torch
from conftest import TOL

from prism_lightning.config import LoraArgs, ModelArgs
from prism_lightning.data.tokenize import Encoder, pad_batch
from prism_lightning.influence.objective import mean_logprob
from prism_lightning.influence.per_example import PerExampleGradients, lora_linears
from prism_lightning.influence.preconditioners import adam_precondition
from prism_lightning.modeling import build_model, load_tokenizer

PROMPTS = [("What is 12+7?\n", "19"), ("Reverse abcd\n", "dcba"), ("Capital of Kalomi?\n", "Tuzor"),
           ("I think 20+5 is 26, right?\n", "No, 20+5 is 25."), ("Sort dcab\n", "abcd"),
           ("What is 50-8?\n", "42"), ("Reverse xy\n", "yx"), ("What is 33+44?\n", "77")]


def lora_model(**model_kw):
    torch.manual_seed(0)
    model = build_model(ModelArgs(**model_kw), LoraArgs(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # peft zero-inits lora_B, which would zero every lora_A gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.eval()


def encoded(n):
    tok = load_tokenizer(ModelArgs())
    enc = Encoder(tok, 64)
    return [enc.encode(p, c, "t") for p, c in PROMPTS[:n]], tok.pad_token_id


def batched_grads(model, seqs, pad_id):
    layers = lora_linears(model)
    got: dict[str, torch.Tensor] = {}
    batch = pad_batch(seqs, pad_id)
    with PerExampleGradients(layers, lambda name, g: got.__setitem__(name, g)):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        (-mean_logprob(logits, batch["labels"])).sum().backward()
    model.zero_grad(set_to_none=True)
    return got


def assert_same_grads(got: dict, want: dict) -> None:
    """Per-example gradients {layer: [B, out, in]} equal, layer by layer, within the shared tolerance."""
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL)


def loop_grads(model, seqs, pad_id):
    layers = lora_linears(model)
    rows = []
    for s in seqs:
        batch = pad_batch([s], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        (-mean_logprob(logits, batch["labels"])).sum().backward()
        rows.append({n: m.weight.grad.detach().clone() for n, m in layers.items()})
        model.zero_grad(set_to_none=True)
    return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_lora_per_example_equals_loop(batch_size):
    model = lora_model()
    seqs, pad = encoded(8)
    want = loop_grads(model, seqs, pad)
    for start in range(0, 8, batch_size):
        got = batched_grads(model, seqs[start: start + batch_size], pad)
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name][start: start + batch_size], **TOL)
    assert any(want[n].abs().sum() > 0 for n in want if "lora_A" in n)


def test_gradient_checkpointing_gives_same_grads():
    seqs, pad = encoded(5)
    want = batched_grads(lora_model(), seqs, pad)
    model = lora_model(gradient_checkpointing=True).train()  # HF checkpoints in train mode; dropout is 0
    assert_same_grads(batched_grads(model, seqs, pad), want)


def test_qlora_per_example_equals_loop():
    pytest.importorskip("bitsandbytes")
    model = lora_model(quantization="nf4")
    seqs, pad = encoded(6)
    assert_same_grads(batched_grads(model, seqs, pad), loop_grads(model, seqs, pad))


def test_batch_neighbours_do_not_matter():
    model = lora_model()
    seqs, pad = encoded(8)
    alone = batched_grads(model, [seqs[3]], pad)
    mixed = batched_grads(model, [seqs[7], seqs[3], seqs[0]], pad)
    for name in alone:
        torch.testing.assert_close(mixed[name][1], alone[name][0], **TOL)


def test_adam_precondition_formula():
    g, m, v = torch.randn(3, 10), torch.randn(10), torch.rand(10)
    got = adam_precondition(g, m, v, 0.9, 0.999, 1e-8)
    for b in range(3):
        for i in range(10):
            m2 = 0.9 * m[i] + 0.1 * g[b, i]
            v2 = 0.999 * v[i] + 0.001 * g[b, i] ** 2
            assert abs(got[b, i] - m2 / (v2.sqrt() + 1e-8)) < 1e-4
    plain = adam_precondition(g, m, v, 0.9, 0.999, 1e-8, momentum=False)  # no shared b1 * m term
    torch.testing.assert_close(plain, g / ((0.999 * v + 0.001 * g.square()).sqrt() + 1e-8), **TOL)


def test_bf16_base_per_example_matches_loop():
    """bf16 base weights: the batched per-example gradients agree with a bf16 bs=1 loop.

    Both sides round activations to bf16 (8 bits of mantissa), so they are compared by cosine
    similarity per row rather than with the fp32 tolerance.
    """
    model = lora_model(dtype="bfloat16")
    seqs, pad = encoded(4)
    want = loop_grads(model, seqs, pad)
    got = batched_grads(model, seqs, pad)
    for name in want:
        cos = torch.nn.functional.cosine_similarity(got[name].flatten(1), want[name].float().flatten(1), dim=1)
        assert (cos > 0.99).all(), (name, cos)
