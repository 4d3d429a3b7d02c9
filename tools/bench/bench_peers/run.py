"""Side by side with attribution libraries: pool x target gradient scores on one seeded workload.

Run (after ``bash tools/bench/bench_peers/setup.sh``)::

    .venv-peers/bin/python tools/bench/bench_peers/run.py --workloads S,L
    .venv-peers/bin/python tools/bench/bench_peers/run.py --workloads V \
        --cases "$(python tools/bench/bench_peers/run.py --v-cases)"

Every case runs in its own process (peak RSS per case) on the same model and rows and computes
the full ``pool x target`` score matrix from per-example LoRA gradients of the token-mean
response loss ``l(z) = -lbar(z)`` (what the gradient-feature stage differentiates):

- ``train_step``: one plain LoRA training step over the pool (forward + backward + AdamW; speed limit);
- ``train_step+packed``: the same over the length-aware batches packed without padding, the LM head at answer
  tokens only (the limit of ``+packed`` extraction: the same real tokens, one backward each);
- ``bs1_loop``: a batch-size-1 autograd loop, flattened gradients, then the dot products (exact);
- ``ours:identity``: our per-example gradients, no preconditioner, no projection (exact dot products);
- ``ours:adam+sjlt-k`` / ``ours:adam+rademacher-k``: Adam preconditioning (pool), projection to k;
- ``ours:ekfac+sjlt-k`` / ``ours:kfac+none`` ...: our K-FAC/EK-FAC, fitted on the pool (two passes, as
  kronfluence fits its factors on the pool here), then the preconditioned pool features;
- ``kronfluence:identity`` / ``kronfluence:ekfac``: kronfluence's pairwise scores (identity: plain
  gradient dot products; EK-FAC: fitted on the pool, then the preconditioned scores);
- ``trak-k``: TRAK with its CPU (Rademacher) projector to k on the LoRA parameters only: featurize
  the pool, ``Phi (Phi^T Phi)^-1``, score the targets;
- ``dattri:logra-256``: dattri's LoGra (per-layer Kronecker projection to 16 x 16, eFIM preconditioner);
- ``dattri-llm:tracin`` / ``dattri-llm:ekfac``: dattri-llm's attributors (live hook capture);
- ``bergson:build+query-p``: Bergson builds an on-disk index of the pool (per-module projection to
  ``p x p``; 0 = none), builds the query index, then scores every query against the index.

Workload ``V`` (variable length) runs the L model on rows whose lengths are drawn from a seeded
log-normal (median 100 tokens, sigma 0.99 so that 1% exceed 1,000; cut at 1,200; the response is each
row's second half). Every case batches as it is normally used: ``batch`` rows in pool order padded to the
batch's longest (our ``ours:*`` cases, ``train_step``, kronfluence, dattri's LoGra through a padding
collate), Bergson with its own token-budget allocator, and ``ours:adam+sjlt-8192+tokens`` with the
project's length-aware feature batching (``data.max_tokens_per_batch``: each 256-row shard sorted by
length, packed up to ``V_TOKENS`` padded tokens, at most 64 rows); ``+tokens+packed`` runs those batches with no
padding at all (``data.padding_free``: one sequence per batch, attention inside each row). dattri-llm's
``attribute`` has no collate hook, so rows of different lengths cannot be batched: it is left out of V.

Workload ``R`` (a real vocabulary): V's lengths on the same model shape with Llama-3's 128,256-token vocabulary,
the answer the last quarter of each row (prompts 3x as long), 128 pool and 16 target rows. Its cases set our
features beside ``+full_logits``, the same features computed as the project did before its LM head ran at answer
positions only (``[B, T, vocab]`` logits), and a padded training step (full logits, as HF computes them)::

    .venv/bin/python tools/bench/bench_peers/run.py --workloads R \
        --cases "$(python tools/bench/bench_peers/run.py --r-cases)"

Agreement-only cases (``tests/test_peers.py``): ``ours:adam+none`` (Adam features, no projection,
unit-normalised), ``dattri-llm:less`` (the same maths in dattri-llm's LESS attributor) and
``bergson:build+query-0``.

Columns: examples/s of gradient extraction (pool + target rows over the seconds to features; for
peers that do not expose features, over the whole case), total seconds for all scores, peak RSS,
and the total-time ratio to ``ours:adam+sjlt-8192``. ``--save DIR`` writes each case's scores
(``DIR/<case>.pt``) for the agreement tests.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORKLOADS = {
    # name: hidden, layers, heads, vocab, seq, lora r, pool rows, target rows, batch
    "S": (256, 4, 4, 2048, 128, 8, 512, 32, 16),
    "L": (512, 8, 8, 2048, 256, 16, 1024, 64, 8),
    "1B": (2048, 16, 16, 32000, 512, 16, 512, 32, 8),  # GPU only: random-init 1.2B Llama (Llama-3.2-1B widths)
    "V": (512, 8, 8, 2048, 1200, 16, 512, 32, 8),  # the L model, variable lengths up to 1,200 (see above)
    "R": (512, 8, 8, 128256, 1200, 16, 128, 16, 8),  # V's lengths, Llama-3's vocabulary, answers a quarter (below)
}
V_MEDIAN, V_SIGMA, V_MIN = 100, 0.99, 8  # log-normal row lengths of workload V
V_TOKENS, V_MAX_ROWS, V_SHARD = 4096, 64, 256  # our length-aware feature batching on V
R_CASES = ["train_step", "train_step+packed", "ours:adam+sjlt-8192+tokens+full_logits", "ours:adam+sjlt-8192+tokens",
           "ours:adam+sjlt-8192+tokens+packed"]
V_CASES = ["train_step", "train_step+packed", "ours:adam+sjlt-8192", "ours:adam+sjlt-8192+tokens",
           "ours:adam+sjlt-8192+tokens+packed", "kronfluence:identity",
           "dattri:logra-256", "bergson:build+query-16"]
CASES = ["train_step", "bs1_loop", "ours:identity", "ours:adam+sjlt-1024", "ours:adam+sjlt-8192",
         "ours:adam+rademacher-1024", "ours:ekfac+sjlt-8192", "kronfluence:identity", "kronfluence:ekfac", "trak-1024",
         "dattri:logra-256", "dattri-llm:tracin", "dattri-llm:ekfac", "bergson:build+query-16"]
# Agreement-only cases (tests/test_peers.py): exact maths on both sides, no projection.
EXTRA_CASES = ["ours:adam+none", "dattri-llm:less", "bergson:build+query-0", "ours:ekfac+none", "ours:kfac+none",
               "kronfluence:kfac"]
ADAM_STEP = 10**6  # dattri-llm's LESS applies Adam's bias correction; at a late step it is 1 to float precision
REFERENCE = "ours:adam+sjlt-8192"
REFERENCE_V = "ours:adam+sjlt-8192+tokens"


def build(workload: str, device: str = "cpu"):
    """(peft model, pool batch dict, target batch dict, batch size): seeded random-init Llama and rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, vocab, seq, r, n_pool, n_target, batch = WORKLOADS[workload]
    torch.manual_seed(0)
    if device == "cuda":  # every case alike: TF32 matmuls, and the random init runs on the GPU
        torch.set_float32_matmul_precision("high")
    with torch.device(device):
        base = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                            num_key_value_heads=heads, intermediate_size=4 * hidden, vocab_size=vocab,
                                            max_position_embeddings=seq, attn_implementation="eager"))
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():  # peft zero-inits B, which would zero every A gradient
        gen = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.device) * 0.02)
    model.to(device).eval()

    def rows(n: int, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, vocab, (n, seq), generator=g)
        if workload in ("V", "R"):
            normal = torch.randn(n, generator=torch.Generator().manual_seed(seed + 100))
            lengths = (V_MEDIAN * torch.exp(V_SIGMA * normal)).round().long().clamp(V_MIN, seq)
        else:
            lengths = torch.full((n,), seq)
        position = torch.arange(seq).unsqueeze(0)
        mask = (position < lengths.unsqueeze(1)).long()
        ids = ids * mask  # right padding with token 0
        answer_from = lengths * 3 // 4 if workload == "R" else lengths // 2  # R: prompts 3x as long as answers
        labels = ids.masked_fill((position < answer_from.unsqueeze(1)) | (mask == 0), -100)
        return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}

    return model, rows(n_pool, 2), rows(n_target, 3), batch


def row_losses(model, batch: dict) -> torch.Tensor:
    """``-lbar`` per row [B]."""
    from prism_lightning.influence.objective import mean_logprob

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return -mean_logprob(logits, batch["labels"])


def n_rows(*datas: dict) -> int:
    """Rows in all the given batch dicts (pool + target: the rows a case extracts gradients for)."""
    return sum(d["input_ids"].shape[0] for d in datas)


def lengths_of(data: dict) -> list[int]:
    return data["attention_mask"].sum(1).tolist()


def take(data: dict, rows: list[int]) -> dict:
    """Rows of a batch dict, padded to their longest (dynamic padding)."""
    index = torch.tensor(rows, device=data["input_ids"].device)
    width = int(data["attention_mask"][index].sum(1).max())
    return {k: v[index, :width] for k, v in data.items()}


def batches(data: dict, size: int):
    """``size`` rows at a time in pool order, each batch padded to its longest row."""
    n = data["input_ids"].shape[0]
    for s in range(0, n, size):
        yield take(data, list(range(s, min(s + size, n))))


def packed(b: dict) -> dict:
    """A padded batch dict as one sequence of its real tokens (``data.tokenize.pack_batch``'s layout): position ids
    restarting per row, each row's first token without a label, no attention mask."""
    mask = b["attention_mask"].bool()
    labels = b["labels"].clone()
    labels[:, 0] = -100
    lengths = mask.sum(1)
    positions = torch.cat([torch.arange(int(n), device=mask.device) for n in lengths])
    return {"input_ids": b["input_ids"][mask].unsqueeze(0), "labels": labels[mask].unsqueeze(0),
            "position_ids": positions.unsqueeze(0)}


def pad_collate(items: list[dict]) -> dict:
    """Stack per-row dicts of different lengths, right-padded (ids 0, mask 0, labels -100)."""
    width = max(x["input_ids"].shape[0] for x in items)
    fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {k: torch.stack([torch.nn.functional.pad(x[k], (0, width - x[k].shape[0]), value=v) for x in items])
            for k, v in fill.items()}


class Rows(torch.utils.data.Dataset):
    """A batch dict as a map-style dataset of per-row dicts, each cut to its own length (``pad_collate``)."""

    def __init__(self, data: dict):
        self.data = data

    def __len__(self) -> int:
        return self.data["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict:
        n = int(self.data["attention_mask"][i].sum())
        return {k: v[i, :n] for k, v in self.data.items()}


def adam_moments(layers: dict) -> dict:
    """Seeded stand-in Adam moments (m ~ 1e-3 N(0,1), v ~ 1e-6 U(0,1)) per LoRA layer, weight-shaped, on its device."""
    gen = torch.Generator().manual_seed(4)
    out = {}
    for n, m in sorted(layers.items()):
        shape, dev = m.weight.shape, m.weight.device
        out[n] = (torch.randn(shape, generator=gen).to(dev) * 1e-3, torch.rand(shape, generator=gen).to(dev) * 1e-6)
    return out


# ----- cases ---------------------------------------------------------------------------------
def case_train_step(model, pool, target, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    start = time.perf_counter()
    for b in batches(pool, batch):
        row_losses(model, b).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    secs = time.perf_counter() - start
    return None, n_rows(pool) / secs, secs


def case_train_step_packed(model, pool, target, batch):
    """The limit of padding-free extraction: a training step over the same length-aware batches, packed without
    padding, the LM head at answer tokens only (the project's objective)."""
    from prism_lightning.influence.objective import row_logprob

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    groups = [packed(b) for b in length_batches(pool)[0]]
    start = time.perf_counter()
    for b in groups:
        (-row_logprob(model, b)).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    secs = time.perf_counter() - start
    return None, n_rows(pool) / secs, secs


def case_bs1_loop(model, pool, target, batch):
    params = [p for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)]
    start = time.perf_counter()

    def grads(data):
        out = []
        for i in range(data["input_ids"].shape[0]):
            loss = row_losses(model, {k: v[i: i + 1] for k, v in data.items()}).sum()
            out.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
        return torch.stack(out)

    g_pool, g_target = grads(pool), grads(target)
    extract = time.perf_counter() - start
    scores = g_target.double() @ g_pool.double().T
    rows = n_rows(pool, target)
    return scores, rows / extract, time.perf_counter() - start


def length_batches(data: dict):
    """The project's length-aware feature batching: per ``V_SHARD``-row shard, ``token_batches``; returns
    (batch dicts, the row order they hold)."""
    from prism_lightning.data.samplers import token_batches

    n, lengths = data["input_ids"].shape[0], lengths_of(data)
    groups = [b for s in range(0, n, V_SHARD)
              for b in token_batches(list(range(s, min(s + V_SHARD, n))), lengths[s:s + V_SHARD], V_MAX_ROWS,
                                     V_TOKENS)]
    return [take(data, b) for b in groups], [i for b in groups for i in b]


def full_logits_lbar(model, batch: dict) -> torch.Tensor:
    """The objective as the project computed it before the LM head ran at answer positions only: ``[B, T, vocab]``
    logits (the ``+full_logits`` cases, for the side-by-side comparison)."""
    from prism_lightning.influence.objective import mean_logprob

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return mean_logprob(logits, batch["labels"])


def case_ours(model, pool, target, batch, preconditioner: str, kind: str, dim: int, normalize: bool = False,
              by_tokens: bool = False, full_logits: bool = False, padding_free: bool = False):
    from prism_lightning.influence import extract

    if full_logits:
        extract.row_logprob = full_logits_lbar
    from prism_lightning.config import ProjectionArgs
    from prism_lightning.influence.curvature import fit_factors
    from prism_lightning.influence.extract import gradient_features
    from prism_lightning.influence.per_example import lora_linears
    from prism_lightning.influence.preconditioners import PRECONDITIONERS, Adam
    from prism_lightning.influence.projection import Projector

    layers = lora_linears(model)
    projector = Projector(ProjectionArgs(kind=kind, dim=dim), {n: m.weight.numel() for n, m in layers.items()})
    start = time.perf_counter()
    pre = Adam.from_moments(adam_moments(layers), 0.9, 0.999, 1e-8) if preconditioner == "adam" else None
    if preconditioner in ("kfac", "ekfac"):  # fitted on the pool, as kronfluence's factors here
        pre = PRECONDITIONERS[preconditioner](pool["input_ids"].device)
        pre.factors, pre._inverse = fit_factors(model, layers, list(batches(pool, batch))), {}

    def features(data: dict, precondition) -> torch.Tensor:
        if not by_tokens:
            return torch.cat([gradient_features(model, layers, b, projector, precondition, normalize=normalize)[0]
                              for b in batches(data, batch)])
        groups, order = length_batches(data)
        if padding_free:  # data.padding_free: each batch packed without padding
            groups = [packed(b) for b in groups]
        out = torch.cat([gradient_features(model, layers, b, projector, precondition, normalize=normalize)[0]
                         for b in groups])
        return out[torch.argsort(torch.tensor(order, device=out.device))]  # back to row order

    f_pool, f_target = features(pool, pre), features(target, None)
    extract = time.perf_counter() - start
    scores = f_target.double() @ f_pool.double().T
    rows = n_rows(pool, target)
    return scores, rows / extract, time.perf_counter() - start


def case_kronfluence(model, pool, target, batch, strategy: str):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    from prism_lightning.influence.per_example import lora_linears

    modules = list(lora_linears(model))

    class LoraTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return row_losses(model, batch).sum()

        def compute_measurement(self, batch, model):
            return row_losses(model, batch).sum()

        def get_influence_tracked_modules(self):
            return modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    task = LoraTask()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare_model(model, task)
        analyzer = Analyzer("bench", prepared, task, cpu=pool["input_ids"].device.type == "cpu", disable_tqdm=True,
                            output_dir=tmp)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=pad_collate))
        analyzer.fit_all_factors("f", Rows(pool), per_device_batch_size=batch,
                                 factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
        # K-FAC/EK-FAC: damping 0.1 x the mean eigenvalue of each module (ours: damping 0.1, relative)
        score_args = ScoreArguments(damping_factor=None) if strategy in ("kfac", "ekfac") else None
        # all queries in one batch: one pass over the pool
        analyzer.compute_pairwise_scores("s", "f", Rows(target), Rows(pool), per_device_query_batch_size=n_rows(target),
                                         per_device_train_batch_size=batch, score_args=score_args,
                                         overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("s")["all_modules"].double()
    secs = time.perf_counter() - start
    rows = n_rows(pool, target)
    return scores, rows / secs, secs


def case_trak(model, pool, target, batch, dim: int):
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector, ProjectionType

    from prism_lightning.influence.objective import mean_logprob

    class LanguageModelOutput(AbstractModelOutput):
        """Model output ``lbar(z)`` (so d output / d loss = -1 for every row)."""

        def __init__(self):
            super().__init__()

        def get_output(self, model, weights, buffers, input_ids, attention_mask, labels):
            kwargs = {"input_ids": input_ids.unsqueeze(0), "attention_mask": attention_mask.unsqueeze(0)}
            logits = torch.func.functional_call(model, (weights, buffers), args=(), kwargs=kwargs).logits
            return mean_logprob(logits, labels.unsqueeze(0)).sum()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1, device=batch[0].device)

    if not torch.cuda.is_available():  # finalize_scores pins host memory, which torch refuses without a GPU
        torch.Tensor.pin_memory = lambda self, *a, **k: self
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    device = pool["input_ids"].device
    projector = BasicProjector(grad_dim=n_params, proj_dim=dim, seed=0, proj_type=ProjectionType.rademacher,
                               device=device, dtype=torch.float32)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        traker = TRAKer(model, LanguageModelOutput(), train_set_size=n_rows(pool), save_dir=tmp,
                        load_from_save_dir=True, device=device, projector=projector, use_half_precision=False,
                        grad_wrt=names)
        checkpoint = model.state_dict()
        traker.load_checkpoint(checkpoint, model_id=0)
        for b in batches(pool, batch):
            traker.featurize(batch=[b["input_ids"], b["attention_mask"], b["labels"]],
                             num_samples=b["input_ids"].shape[0])
        traker.finalize_features()
        traker.start_scoring_checkpoint("bench", checkpoint, model_id=0, num_targets=n_rows(target))
        for b in batches(target, batch):
            traker.score(batch=[b["input_ids"], b["attention_mask"], b["labels"]], num_samples=b["input_ids"].shape[0])
        scores = torch.as_tensor(traker.finalize_scores("bench")).double().T  # [target, pool]
    secs = time.perf_counter() - start
    return scores, n_rows(pool, target) / secs, secs


def case_dattri_llm(model, pool, target, batch, method: str):
    """dattri-llm's TracIn, EK-FAC or LESS attributor (live hook capture) as a ``[target, pool]`` matrix."""
    import dattri_llm
    from dattri_llm import AttributionArguments, AttributionTask
    from dattri_llm.utils.hashing import hash_batch

    task = AttributionTask(loss_func=lambda m, b: row_losses(m, b).sum(), model=model)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        args = AttributionArguments(output_dir=tmp, per_device_train_batch_size=batch,
                                    per_device_eval_batch_size=batch, seed=0)
        if method == "less":  # the frozen form at one checkpoint with the same seeded moments as ours
            from prism_lightning.influence.per_example import lora_linears

            layers = lora_linears(model)
            optimizer = torch.optim.AdamW([m.weight for m in layers.values()], lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
            for n, (m, v) in adam_moments(layers).items():
                weight = layers[n].weight
                optimizer.state[weight] = {"step": torch.tensor(float(ADAM_STEP - 1)),
                                           "exp_avg": m.view_as(weight).clone(),
                                           "exp_avg_sq": v.view_as(weight).clone()}
            attributor = dattri_llm.LESSAttributor(args, task=task, optimizers=[optimizer])
        else:
            attributor = {"tracin": dattri_llm.TracInAttributor, "ekfac": dattri_llm.EKFACAttributor}[method](
                args, task=task)
        cpu = lambda data: Rows({k: v.cpu() for k, v in data.items()})  # noqa: E731 - its loaders pin host memory
        score = attributor.attribute(cpu(pool), cpu(target))
        ids, matrix = score.agnostic_matrix()  # [train, test], rows/columns by content hash
    secs = time.perf_counter() - start
    row = {h: i for i, h in enumerate(ids)}
    key = lambda data: hash_batch({"input_ids": data["input_ids"]})  # noqa: E731 - it hashes the model inputs
    train_order, test_order = [row[h] for h in key(pool)], [score.test_index[h] for h in key(target)]
    scores = matrix[train_order][:, test_order].double().T
    rows = n_rows(pool, target)
    return scores, rows / secs, secs


def case_dattri_logra(model, pool, target, batch, dim: int):
    """dattri's LoGra (per-layer Kronecker projection to ``dim`` = p^2, eFIM preconditioner) on the LoRA layers.

    Its query side calls ``model(**batch).loss`` (the batch's token mean, ``1/B`` of each row's loss
    when every row has the same response length), so query gradients are scaled back by ``B``.
    """
    from dattri.algorithm.logra import LoGraAttributor
    from dattri.task import AttributionTask

    from prism_lightning.influence.per_example import lora_linears

    names = list(lora_linears(model))
    device = str(pool["input_ids"].device)
    task = AttributionTask(loss_func=lambda m, b, dev=None: row_losses(m, b).sum(), model=model,
                           checkpoints=model.state_dict())
    loader = lambda data: torch.utils.data.DataLoader(Rows(data), batch_size=batch, shuffle=False,  # noqa: E731
                                                      collate_fn=pad_collate)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # its metadata file goes to cache_dir (default: the working dir)
        attributor = LoGraAttributor(task, layer_names=names, hessian="eFIM", device=device, proj_dim=dim,
                                     offload="cpu", cache_dir=tmp)
        attributor.cache(loader(pool))
        scores = attributor.attribute(loader(pool), loader(target)).double().T * batch  # [target, pool]
    secs = time.perf_counter() - start
    rows = n_rows(pool, target)
    return scores, rows / secs, secs


def case_bergson(model, pool, target, batch, dim: int):
    """Bergson: build an on-disk index of the pool's LoRA gradients (per-module projection to ``dim x dim``,
    0 = none), build the query index the same way, then score every query against the index."""
    import shutil

    from bergson import Attributor, collect_gradients, load_gradients
    from bergson.config.config import IndexConfig
    from bergson.data import allocate_batches, column_offsets
    from bergson.utils.worker_utils import extract_peft_target_modules, processor_for
    from datasets import Dataset

    modules = extract_peft_target_modules(model)
    seq = pool["input_ids"].shape[1]
    variable = len(set(lengths_of(pool))) > 1

    def build_index(data: dict, path: str) -> None:
        tokens = V_TOKENS if variable else batch * seq
        cfg = IndexConfig(run_path=path, projection_dim=dim, loss_reduction="mean", token_batch_size=tokens)
        cfg.partial_run_path.mkdir(parents=True)
        processor = processor_for(cfg)
        processor.save(cfg.partial_run_path)
        n, lengths = data["input_ids"].shape[0], lengths_of(data)
        view = Rows(data)
        rows = [view[i] for i in range(n)]
        ds = Dataset.from_dict({"input_ids": [r["input_ids"].tolist() for r in rows],
                                "labels": [r["labels"].tolist() for r in rows], "length": lengths})
        # fixed length: consecutive batches; variable: Bergson's own token-budget allocator
        plan = (allocate_batches(lengths, tokens) if variable else
                [list(range(s, min(s + batch, n))) for s in range(0, n, batch)])
        collect_gradients(model, ds, processor, cfg, batches=plan, target_modules=modules)
        shutil.move(cfg.partial_run_path, cfg.run_path)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        build_index(pool, f"{tmp}/pool")
        build_index(target, f"{tmp}/query")
        attributor = Attributor(f"{tmp}/pool", device=str(pool["input_ids"].device))
        extract = time.perf_counter() - start
        mmap = load_gradients(f"{tmp}/query")
        with open(f"{tmp}/query/info.json") as f:
            sizes = json.load(f)["grad_sizes"]
        queries = {name: torch.from_numpy(mmap[:, lo:hi].copy()).float() for name, (lo, hi) in
                   column_offsets(sizes).items()}
        top, index = attributor.search(queries, k=None)
        scores = torch.empty_like(top).scatter_(1, index, top).double()  # undo the top-k sort: [target, pool]
    rows = n_rows(pool, target)
    return scores, rows / extract, time.perf_counter() - start


def run_case(workload: str, case: str, device: str = "cpu") -> tuple[torch.Tensor | None, dict]:
    model, pool, target, batch = build(workload, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if case == "train_step":
        scores, rate, secs = case_train_step(model, pool, target, batch)
    elif case == "train_step+packed":
        scores, rate, secs = case_train_step_packed(model, pool, target, batch)
    elif case == "bs1_loop":
        scores, rate, secs = case_bs1_loop(model, pool, target, batch)
    elif case == "ours:identity":
        scores, rate, secs = case_ours(model, pool, target, batch, "identity", "none", 0)
    elif case == "ours:adam+none":  # cosine of Adam pool features and raw target gradients, as LESS scores
        scores, rate, secs = case_ours(model, pool, target, batch, "adam", "none", 0, normalize=True)
    elif case in ("ours:ekfac+none", "ours:kfac+none"):  # exact: no projection, no normalisation
        scores, rate, secs = case_ours(model, pool, target, batch, case[5:].split("+")[0], "none", 0)
    elif case.startswith(("ours:adam+", "ours:ekfac+")):
        kind, dim = case.split("+")[1].split("-")
        scores, rate, secs = case_ours(model, pool, target, batch, case[5:].split("+")[0], kind, int(dim),
                                       by_tokens="+tokens" in case, full_logits=case.endswith("+full_logits"),
                                       padding_free=case.endswith("+packed"))
    elif case.startswith("dattri-llm:"):
        scores, rate, secs = case_dattri_llm(model, pool, target, batch, case.split(":")[1])
    elif case.startswith("dattri:logra-"):
        scores, rate, secs = case_dattri_logra(model, pool, target, batch, int(case.split("-")[1]))
    elif case.startswith("bergson:build+query-"):
        scores, rate, secs = case_bergson(model, pool, target, batch, int(case.split("-")[1]))
    elif case.startswith("trak-"):
        scores, rate, secs = case_trak(model, pool, target, batch, int(case.split("-")[1]))
    elif case.startswith("kronfluence:"):
        scores, rate, secs = case_kronfluence(model, pool, target, batch, case.split(":")[1])
    else:
        raise ValueError(f"unknown case {case!r}; choose from {CASES + EXTRA_CASES + V_CASES + R_CASES}")
    if device == "cuda":
        torch.cuda.synchronize()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return None if scores is None else scores.cpu(), {"examples_per_s": rate, "seconds": secs, "peak_rss_mb": rss,
                                                      "peak_gpu_mb": gpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="S,L")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--save", help="folder for each case's scores (<workload>-<case>.pt)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (every case on the same device)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run: a case still running when they are "
                        "spent is stopped and later ones are skipped (for a lent machine's time limit)")
    parser.add_argument("--v-cases", action="store_true", help="print workload V's cases and exit")
    parser.add_argument("--r-cases", action="store_true", help="print workload R's cases and exit")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.v_cases or args.r_cases:
        print(",".join(V_CASES if args.v_cases else R_CASES))
        return
    if args.case:  # child: one case, JSON on stdout
        scores, res = run_case(args.workload, args.case, args.device)
        if args.save and scores is not None:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            torch.save(scores, Path(args.save) / f"{args.workload}-{args.case.replace(':', '_')}.pt")
        print(json.dumps(res))
        return
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
    table = {}
    deadline = time.monotonic() + args.budget if args.budget else None
    for workload in args.workloads.split(","):
        res = table.setdefault(workload, {})
        for case in args.cases.split(","):
            cmd = [sys.executable, __file__, "--case", case, "--workload", workload, "--device", args.device]
            if args.save:
                cmd += ["--save", args.save]
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left < 5:
                res[case] = {"error": "skipped: out of --budget"}
                continue
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            except subprocess.TimeoutExpired:
                res[case] = {"error": f"stopped at the --budget ({args.budget:.0f} s)"}
                print(f"  {workload} {case}: {res[case]}", file=sys.stderr, flush=True)
                continue
            if out.returncode:
                res[case] = {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:120]}
            else:
                res[case] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {workload} {case}: {res[case]}", file=sys.stderr, flush=True)
    header = (f"{'wl':<4}{'case':<28}{'extract ex/s':>13}{'scores s':>10}{'peak RSS MB':>13}{'peak GPU MB':>13}"
              f"{'time / ours':>13}")
    for workload, res in table.items():
        print(header)
        print("-" * len(header))
        ref = res.get(REFERENCE_V if workload in ("V", "R") else REFERENCE, {}).get("seconds")
        for case, r in res.items():
            if "error" in r:
                print(f"{workload:<4}{case:<28} FAILED: {r['error']}")
                continue
            ratio = f"{r['seconds'] / ref:>12.2f}x" if ref else f"{'-':>13}"
            gpu = f"{r['peak_gpu_mb']:>13.0f}" if r.get("peak_gpu_mb") is not None else f"{'-':>13}"
            print(f"{workload:<4}{case:<28}{r['examples_per_s']:>13.1f}{r['seconds']:>10.2f}{r['peak_rss_mb']:>13.0f}"
                  f"{gpu}{ratio}")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
