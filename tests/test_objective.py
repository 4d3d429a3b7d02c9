"""The objective with the LM head run only at answer positions equals the full-logits objective (values and
gradients, per row), and no ``[B, T, vocab]`` logits exist while it runs."""

from __future__ import annotations

import torch
from conftest import TOL
from test_per_example import assert_same_grads, encoded, loop_grads, lora_model

from prism_lightning.data.tokenize import pack_batch, pad_batch
from prism_lightning.influence.objective import mean_logprob, packed_rows, row_logprob
from prism_lightning.influence.per_example import PerExampleGradients, lora_linears


def test_answer_only_head_equals_full_logits():
    model = lora_model()
    seqs, pad = encoded(8)  # right-padded rows of different prompt and answer lengths
    batch = pad_batch(seqs, pad)
    params = [p for p in model.parameters() if p.requires_grad]
    full = mean_logprob(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                        batch["labels"])
    full_grads = torch.autograd.grad(full.sum(), params)
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    ours = row_logprob(model, batch)
    hook.remove()
    our_grads = torch.autograd.grad(ours.sum(), params)
    torch.testing.assert_close(ours, full, **TOL)
    for a, b in zip(our_grads, full_grads):
        torch.testing.assert_close(a, b, **TOL)
    answer_tokens = int((batch["labels"] != -100).sum())
    assert shapes == [(answer_tokens, model.config.vocab_size)]  # the head ran on the answer tokens only
    assert answer_tokens < batch["input_ids"].numel() / 2


def test_per_example_gradients_through_the_answer_only_head_equal_a_loop():
    model = lora_model()
    seqs, pad = encoded(8)
    got: dict[str, torch.Tensor] = {}
    with PerExampleGradients(lora_linears(model), lambda name, g: got.__setitem__(name, g)):
        (-row_logprob(model, pad_batch(seqs, pad))).sum().backward()
    model.zero_grad(set_to_none=True)
    assert_same_grads(got, loop_grads(model, seqs, pad))  # batch-size-1 autograd on the full logits


def test_the_head_hook_leaves_other_forwards_alone():
    model = lora_model()
    seqs, pad = encoded(3)
    batch = pad_batch(seqs, pad)
    row_logprob(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)


def test_packed_batch_equals_padded_batch():
    """No padding at all: rows packed into one sequence give the padded batch's lbar and per-row gradients."""
    model = lora_model()
    seqs, pad = encoded(8)
    padded, packed = pad_batch(seqs, pad), pack_batch(seqs)
    assert packed["input_ids"].shape == (1, sum(len(s.input_ids) for s in seqs))
    torch.testing.assert_close(row_logprob(model, packed), row_logprob(model, padded), **TOL)
    got: dict[str, torch.Tensor] = {}
    with PerExampleGradients(lora_linears(model), lambda name, g: got.__setitem__(name, g),
                             packed_rows(packed["position_ids"])):
        (-row_logprob(model, packed)).sum().backward()
    model.zero_grad(set_to_none=True)
    assert_same_grads(got, loop_grads(model, seqs, pad))


def test_packed_gradient_features_equal_padded():
    from prism_lightning.config import ProjectionArgs
    from prism_lightning.influence.extract import gradient_features
    from prism_lightning.influence.projection import Projector

    model = lora_model()
    seqs, pad = encoded(8)
    layers = lora_linears(model)
    projector = Projector(ProjectionArgs(kind="sjlt", dim=256), {n: m.weight.numel() for n, m in layers.items()})
    a, lbar_a = gradient_features(model, layers, pad_batch(seqs, pad), projector)
    b, lbar_b = gradient_features(model, layers, pack_batch(seqs), projector)
    torch.testing.assert_close(b, a, **TOL)
    torch.testing.assert_close(lbar_b, lbar_a, **TOL)


def test_varlen_attention_keeps_rows_apart():
    """A row's likelihood in a pack does not depend on its neighbours."""
    model = lora_model()
    seqs, _ = encoded(3)
    alone = row_logprob(model, pack_batch([seqs[1]]))
    mixed = row_logprob(model, pack_batch([seqs[0], seqs[1], seqs[2]]))
    torch.testing.assert_close(mixed[1:2], alone, **TOL)
