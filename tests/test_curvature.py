"""K-FAC / EK-FAC: the fitted factors and the preconditioned gradients against dense brute force.

A toy "language model" (embedding -> one trainable linear layer -> output head) has every quantity
written out: the layer's inputs ``x`` and output gradients ``dy`` per token, and per-example gradients
from a batch-size-1 autograd loop. The dense Fisher ``F = mean_b vec(G_b) vec(G_b)^T`` built from them
is the reference: EK-FAC must equal ``(Q diag(diag(Q^T F Q)) Q^T + d I)^-1 g`` with ``Q = Q_S (x) Q_A``,
K-FAC ``(S (x) A + d I)^-1 g``. Then the Lightning stage: batch-size independence, the factor file
beside each checkpoint, refusal of missing or stale factors, and the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import TOL
from torch import nn

from prism_lightning import TINY_MODEL
from prism_lightning.config import ProjectionArgs
from prism_lightning.data import PrismDataModule
from prism_lightning.errors import StageMismatchError, StoreMismatchError
from prism_lightning.influence import curvature as C
from prism_lightning.influence.objective import IGNORE, mean_logprob
from prism_lightning.influence.preconditioners import EKFAC, KFAC
from prism_lightning.modules import CurvatureModule, GradientFeatureModule
from prism_lightning.modules.curvature import fit_curvature
from prism_lightning.store.feature_store import FeatureStore

VOCAB, D_IN, D_OUT, T = 11, 5, 3, 6


class Toy(nn.Module):
    """``logits = head(layer(embed(ids)))``: no token mixing, so every gradient is easy to write out."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D_IN)
        self.layer = nn.Linear(D_IN, D_OUT, bias=False)
        self.head = nn.Linear(D_OUT, VOCAB, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.embed.weight.requires_grad_(False)
        self.head.weight.requires_grad_(False)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.head(self.layer(self.embed(input_ids))))


def toy_rows(n: int = 7) -> dict:
    """Right-padded rows of varied length; the response is the second half of each row."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([6, 4, 5, 3, 6, 2, 5][:n])
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    pos = torch.arange(T)[None]
    mask = (pos < lengths[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill((pos < (lengths // 2)[:, None]) | (mask == 0), IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def split(rows: dict, size: int) -> list[dict]:
    n = rows["input_ids"].shape[0]
    return [{k: v[i: i + size] for k, v in rows.items()} for i in range(0, n, size)]


def brute_force(model: Toy, rows: dict):
    """(A, S) as token means over real tokens, and per-example gradients [N, out*in] from a bs-1 loop."""
    x = model.embed(rows["input_ids"]).detach()
    y = model.layer(x)
    y.retain_grad()
    (-mean_logprob(model.head(y), rows["labels"])).sum().backward()
    dy = y.grad.detach()
    model.zero_grad(set_to_none=True)
    valid = rows["attention_mask"].bool()
    xs, dys = x[valid].double(), dy[valid].double()
    a, s = xs.T @ xs / valid.sum(), dys.T @ dys / valid.sum()
    grads = []
    for i in range(rows["input_ids"].shape[0]):
        one = {k: v[i: i + 1] for k, v in rows.items()}
        (g,) = torch.autograd.grad(C.row_losses(model, one).sum(), [model.layer.weight])
        grads.append(g.flatten().double())
    return a, s, torch.stack(grads)


def test_ekfac_and_kfac_equal_dense_brute_force():
    model, rows = Toy(), toy_rows()
    layers = {"layer": model.layer}
    a, s, grads = brute_force(model, rows)
    factors = C.fit_factors(model, layers, split(rows, 3))["layer"]
    # the covariances, through their eigendecompositions
    for side, want in (("activation", a), ("gradient", s)):
        q, e = factors[f"{side}_eigenvectors"].double(), factors[f"{side}_eigenvalues"].double()
        torch.testing.assert_close(q @ torch.diag(e) @ q.T, want, **TOL)
    q = torch.kron(factors["gradient_eigenvectors"].double(), factors["activation_eigenvectors"].double())
    fisher = grads.T @ grads / grads.shape[0]  # the dense empirical Fisher from the same per-example grads
    lam = torch.diagonal(q.T @ fisher @ q)
    torch.testing.assert_close(factors["lambda"].double().flatten(), lam, **TOL)
    damping = 0.1
    ekfac_dense = q @ torch.diag(lam) @ q.T + damping * lam.mean() * torch.eye(len(lam), dtype=torch.float64)
    kron = torch.kron(s, a)
    kfac_dense = kron + damping * torch.linalg.eigvalsh(kron).mean() * torch.eye(len(lam), dtype=torch.float64)
    g = grads.view(-1, D_OUT, D_IN).float()
    for cls, dense in ((EKFAC, ekfac_dense), (KFAC, kfac_dense)):
        pre = cls(damping=damping)
        pre.factors, pre._inverse = {"layer": factors}, {}
        ours = pre.precondition("layer", g).reshape(len(g), -1).double()
        want = torch.linalg.solve(dense, grads.T).T
        scale = want.abs().max()
        torch.testing.assert_close(ours / scale, want / scale, **TOL)


def test_lambda_of_one_row_holds_its_squared_gradient():
    """With one fitting row ``Lambda`` is ``(Q_S^T G Q_A)^2``: a rotation, so it sums to ``|G|^2``."""
    model, rows = Toy(), toy_rows(1)
    factors = C.fit_factors(model, {"layer": model.layer}, [rows])["layer"]
    _, _, grads = brute_force(model, rows)
    assert torch.isclose(factors["lambda"].double().sum(), grads.square().sum(), rtol=1e-4)


def test_factors_do_not_depend_on_batch_size():
    model, rows = Toy(), toy_rows()
    one = C.fit_factors(model, {"layer": model.layer}, split(rows, 1))["layer"]
    all_rows = C.fit_factors(model, {"layer": model.layer}, [rows])["layer"]
    for kind in ("activation_eigenvalues", "gradient_eigenvalues", "lambda"):
        torch.testing.assert_close(one[kind], all_rows[kind], **TOL)


def test_factor_file_round_trip_and_refusal(tmp_path):
    factors = {"layer": {k: torch.randn(3, 3) for k in C.KINDS}}
    C.save_factors(tmp_path, factors, {"adapter_sha256": "abc", "rows": 2})
    back = C.load_factors(tmp_path, "abc")
    torch.testing.assert_close(back["layer"]["lambda"], factors["layer"]["lambda"])
    with pytest.raises(StoreMismatchError, match="adapter_sha256: recorded 'abc', now 'other'"):
        C.load_factors(tmp_path, "other")
    with pytest.raises(FileNotFoundError, match="prism_lightning curvature"):
        C.load_factors(tmp_path / "none", "abc")


# ----- the Lightning stage ------------------------------------------------------------------------------
def data_module(small_data, batch_size: int = 8) -> PrismDataModule:
    return PrismDataModule(tokenizer=TINY_MODEL,
                           pool=str(small_data["pool"]), target=str(small_data["target_pairs"]), eval_sft=None,
                           eval_pairs=None, eval_batch_size=batch_size, shard_size=16, max_length=64,
                           warmup_fraction=0.5)


def trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", inference_mode=False, logger=False, enable_progress_bar=False,
                     enable_model_summary=False)


def fit(warmed, small_data, batch_size: int = 8, **kw) -> CurvatureModule:
    module = CurvatureModule(checkpoint_dir=str(warmed / "warmup"), **kw)
    fit_curvature(trainer(), module, data_module(small_data, batch_size))
    return module


@pytest.mark.slow
def test_stage_writes_factors_beside_each_checkpoint_independent_of_batch_size(warmed, small_data, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(warmed / "warmup", copy / "warmup")
    fit(copy, small_data, batch_size=3)
    first = {e: C.load_factors(copy / "warmup" / f"epoch-{e}", json.loads(
        (copy / "warmup" / f"epoch-{e}" / "checkpoint.json").read_text())["adapter_sha256"]) for e in (1, 2)}
    record = C.factors_record(copy / "warmup" / "epoch-2")
    assert record["rows"] == 24 and record["tokens"] > record["rows"]
    fit(copy, small_data, batch_size=8, force=True)  # same rows: nothing to refit, the file is kept
    assert C.factors_record(copy / "warmup" / "epoch-2")["sha256"] == record["sha256"]
    for f in (copy / "warmup").glob("epoch-*/curvature.*"):
        f.unlink()
    fit(copy, small_data, batch_size=8)
    for e in (1, 2):
        info = json.loads((copy / "warmup" / f"epoch-{e}" / "checkpoint.json").read_text())
        again = C.load_factors(copy / "warmup" / f"epoch-{e}", info["adapter_sha256"])
        for layer, kinds in first[e].items():
            for kind in ("activation_eigenvalues", "gradient_eigenvalues", "lambda"):
                torch.testing.assert_close(again[layer][kind], kinds[kind], **TOL)
    # other fitting rows are refused, then refitted with force
    other = data_module(small_data)
    other.warmup_fraction = 0.25
    with pytest.raises(StageMismatchError, match="fit_rows.warmup_fraction: recorded 0.5, now 0.25.*other warmup rows"):
        fit_curvature(trainer(), CurvatureModule(checkpoint_dir=str(copy / "warmup")), other)
    other = data_module(small_data)
    other.warmup_fraction = 0.25
    fit_curvature(trainer(), CurvatureModule(checkpoint_dir=str(copy / "warmup"), force=True), other)
    assert C.factors_record(copy / "warmup" / "epoch-2")["rows"] == 12


def warmup_without_factors(warmed: Path, tmp_path: Path) -> Path:
    """A copy of the shared warmup run (``<tmp>/run/warmup``) with no curvature factors."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(warmed / "warmup", copy / "warmup")
    for f in (copy / "warmup").glob("epoch-*/curvature.*"):
        f.unlink()
    return copy


@pytest.mark.slow
def test_features_with_ekfac_need_factors_and_name_them(warmed, small_data, tmp_path):
    copy = warmup_without_factors(warmed, tmp_path)
    module = GradientFeatureModule(checkpoint_dir=str(copy / "warmup"), output_dir=str(copy),
                                   projection=ProjectionArgs(kind="none"), pool_preconditioner="ekfac",
                                   normalize=False, damping=0.05)
    with pytest.raises(FileNotFoundError, match="prism_lightning curvature"):
        trainer().predict(module, datamodule=data_module(small_data), return_predictions=False)
    assert not (copy / "features").exists()  # refused before any compute
    fit(copy, small_data)
    module = GradientFeatureModule(checkpoint_dir=str(copy / "warmup"), output_dir=str(copy),
                                   projection=ProjectionArgs(kind="none"), pool_preconditioner="ekfac",
                                   normalize=False, damping=0.05)
    trainer().predict(module, datamodule=data_module(small_data), return_predictions=False)
    store = FeatureStore(copy / "features" / "epoch-2" / "pool")
    assert store.manifest["damping"] == 0.05
    assert store.manifest["curvature_sha256"] == C.factors_record(copy / "warmup" / "epoch-2")["sha256"]
    # the stored features are the EK-FAC-preconditioned exact gradients
    from prism_lightning.config import LoraArgs, ModelArgs
    from prism_lightning.influence.per_example import lora_linears
    from prism_lightning.modeling import build_model

    folder = copy / "warmup" / "epoch-2"
    model = build_model(ModelArgs(), LoraArgs(), adapter_path=folder, trainable=True).eval()
    layers = lora_linears(model)
    dm = data_module(small_data)
    dm.load()
    ds, collate = dm.split_dataset("pool")
    batch = collate([ds[3]])
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    names = sorted(layers)
    grads = torch.autograd.grad(C.row_losses(model, batch).sum(), [layers[n].weight for n in names])
    pre = EKFAC(damping=0.05)
    pre.load(folder, json.loads((folder / "checkpoint.json").read_text()))
    want = torch.cat([pre.precondition(n, g[None]).flatten() for n, g in zip(names, grads)])
    got = store.load("features")[3].float()
    scale = want.abs().max()
    torch.testing.assert_close(got / scale, want / scale, **TOL)
    # a refit at another adapter is refused by name
    info = json.loads((folder / "checkpoint.json").read_text())
    record = json.loads((folder / C.RECORD_FILE).read_text())
    (folder / C.RECORD_FILE).write_text(json.dumps(dict(record, adapter_sha256="0" * 64)))
    with pytest.raises(StoreMismatchError, match="adapter_sha256: recorded '0000"):
        C.load_factors(folder, info["adapter_sha256"])


@pytest.mark.slow
def test_curvature_cli_then_ekfac_features(warmed, small_data, tmp_path):
    from prism_lightning.cli import main

    copy = warmup_without_factors(warmed, tmp_path)
    data = ["--data.pool", str(small_data["pool"]), "--data.target", str(small_data["target_pairs"]),
            "--data.eval_sft", "null", "--data.eval_pairs", "null", "--data.warmup_fraction", "0.5"]
    main(["curvature", "--config", "configs/tiny/curvature.yaml", "--model.checkpoint_dir", str(copy / "warmup"),
          *data])
    assert C.factors_record(copy / "warmup" / "epoch-1")["rows"] == 24
    main(["predict", "--config", "configs/tiny/features.yaml", "--model.checkpoint_dir", str(copy / "warmup"),
          "--model.output_dir", str(copy), "--model.pool_preconditioner", "ekfac", "--model.damping", "0.2", *data])
    assert FeatureStore(copy / "features" / "epoch-2" / "pool").manifest["damping"] == 0.2


@pytest.mark.slow
def test_a_store_made_with_other_damping_or_refitted_factors_is_refused(warmed, small_data, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(warmed / "warmup", copy / "warmup")
    fit(copy, small_data, force=True)

    def features(damping: float) -> None:
        module = GradientFeatureModule(checkpoint_dir=str(copy / "warmup"), output_dir=str(copy), epochs=[2],
                                       projection=ProjectionArgs(kind="none"), pool_preconditioner="kfac",
                                       damping=damping, splits=["pool"])
        trainer().predict(module, datamodule=data_module(small_data), return_predictions=False)

    features(0.1)
    with pytest.raises(StoreMismatchError, match="damping"):
        features(0.2)
    other = data_module(small_data)
    other.warmup_fraction = 0.25
    fit_curvature(trainer(), CurvatureModule(checkpoint_dir=str(copy / "warmup"), force=True), other)
    with pytest.raises(StoreMismatchError, match="curvature_sha256"):
        features(0.1)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("shard_size", ["4", "64"])  # 64: one shard, so rank 1 has no batch and adds zeros
def test_ddp_two_processes_fit_the_same_factors_as_one(warmed, small_data, tmp_path, shard_size):
    import shutil

    from conftest import run_cli

    common = ["--data.pool", str(small_data["pool"]), "--data.target", str(small_data["target_pairs"]),
              "--data.eval_sft", "null", "--data.eval_pairs", "null", "--data.warmup_fraction", "0.5",
              "--data.shard_size", shard_size, "--data.eval_batch_size", "3"]
    for name, extra in (("single", []), ("ddp", ["--trainer.devices", "2", "--trainer.strategy", "ddp"])):
        shutil.copytree(warmed / "warmup", tmp_path / name / "warmup")
        for f in (tmp_path / name / "warmup").glob("epoch-*/curvature.*"):
            f.unlink()
        run_cli(["curvature", "--config", "configs/tiny/curvature.yaml", "--model.checkpoint_dir",
                 str(tmp_path / name / "warmup"), *common, *extra], threads=1)
    for epoch in (1, 2):
        folder = {n: tmp_path / n / "warmup" / f"epoch-{epoch}" for n in ("single", "ddp")}
        sha = json.loads((folder["single"] / "checkpoint.json").read_text())["adapter_sha256"]
        a, b = (C.load_factors(folder[n], sha) for n in ("single", "ddp"))
        assert C.factors_record(folder["ddp"])["rows"] == 24 == C.factors_record(folder["single"])["rows"]
        for layer in a:
            for kind in ("activation_eigenvalues", "gradient_eigenvalues", "lambda"):
                torch.testing.assert_close(a[layer][kind], b[layer][kind], **TOL)
