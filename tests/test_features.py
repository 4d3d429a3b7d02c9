"""The feature store: exactness vs brute force, batch-size independence, resume, refusal, DDP."""

from __future__ import annotations

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from conftest import TOL, run_cli
from safetensors.torch import load_file

from prism_lightning import TINY_MODEL
from prism_lightning.config import LoraArgs, ModelArgs, ProjectionArgs
from prism_lightning.data import PrismDataModule
from prism_lightning.errors import StoreMismatchError
from prism_lightning.influence.objective import mean_logprob
from prism_lightning.influence.per_example import lora_linears
from prism_lightning.modeling import build_model
from prism_lightning.modules import GradientFeatureModule
from prism_lightning.store.feature_store import FeatureStore


def extract(warmed, data, out, batch_size=8, shard_size=16, **kw):
    dm = PrismDataModule(tokenizer=TINY_MODEL, pool=str(data["pool"]), target=str(data["target_pairs"]), eval_sft=None,
                         eval_pairs=None, eval_batch_size=batch_size, shard_size=shard_size, max_length=64)
    args = {"projection": ProjectionArgs(kind="none"), "normalize": False} | kw
    module = GradientFeatureModule(checkpoint_dir=str(warmed / "warmup"), output_dir=str(out), **args)
    trainer = L.Trainer(accelerator="cpu", inference_mode=False, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.predict(module, datamodule=dm, return_predictions=False)
    return dm


def brute_force(folder, dm, split="pool"):
    """Per-row gradients and lbar from a batch-size-1 loop at one checkpoint."""
    model = build_model(ModelArgs(), LoraArgs(), adapter_path=folder, trainable=True).eval()
    layers = lora_linears(model)
    ds, collate = dm.split_dataset(split)
    grads, lbars = [], []
    for i in range(len(ds)):
        batch = collate([ds[i]])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lbar = mean_logprob(logits, batch["labels"])
        rows = []
        for j in range(lbar.shape[0]):
            model.zero_grad(set_to_none=True)
            (-lbar[j]).backward(retain_graph=True)
            rows.append({n: layers[n].weight.grad.flatten().clone() for n in sorted(layers)})
        grads.append(rows)
        lbars.append(lbar.detach())
    return grads, lbars, layers


@pytest.mark.slow
def test_pool_and_target_features_equal_brute_force(warmed, small_data, tmp_path):
    dm = extract(warmed, small_data, tmp_path, batch_size=5, pool_preconditioner="identity")
    folder = warmed / "warmup" / "epoch-2"
    grads, lbars, _ = brute_force(folder, dm)
    want = torch.stack([torch.cat([g[0][n] for n in sorted(g[0])]) for g in grads])
    store = FeatureStore(tmp_path / "features" / "epoch-2" / "pool")
    torch.testing.assert_close(store.load("features"), want, **TOL)
    torch.testing.assert_close(store.load("loss"), -torch.cat(lbars), **TOL)
    assert store.load("index").tolist() == list(range(len(want)))
    tgrads, tlbars, _ = brute_force(folder, dm, "target")
    target = FeatureStore(tmp_path / "features" / "epoch-2" / "target")
    chosen = torch.stack([torch.cat([g[0][n] for n in sorted(g[0])]) for g in tgrads])
    rejected = torch.stack([torch.cat([g[1][n] for n in sorted(g[1])]) for g in tgrads])
    torch.testing.assert_close(target.load("chosen"), chosen, **TOL)
    torch.testing.assert_close(target.load("rejected"), rejected, **TOL)
    torch.testing.assert_close(target.load("lbar_chosen"), torch.stack([x[0] for x in tlbars]), **TOL)
    torch.testing.assert_close(target.load("lbar_rejected"), torch.stack([x[1] for x in tlbars]), **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["adam", "adam_no_momentum"])
def test_adam_features_equal_formula(warmed, small_data, tmp_path, pre):
    """Stored features equal m'/(sqrt(v')+eps) (``adam``) or g/(sqrt(v')+eps) (``adam_no_momentum``), written out."""
    dm = extract(warmed, small_data, tmp_path, batch_size=7, splits=["pool"], pool_preconditioner=pre)
    folder = warmed / "warmup" / "epoch-1"
    info = json.loads((folder / "checkpoint.json").read_text())
    (b1, b2), eps = info["betas"], info["eps"]
    state = load_file(str(folder / "optimizer.safetensors"))
    grads, _, layers = brute_force(folder, dm)
    rows = []
    for g in grads:
        parts = []
        for n in sorted(layers):
            m, v, gn = state[f"{n}.weight.exp_avg"].flatten(), state[f"{n}.weight.exp_avg_sq"].flatten(), g[0][n]
            step = b1 * m + (1 - b1) * gn if pre == "adam" else gn
            parts.append(step / ((b2 * v + (1 - b2) * gn.square()).sqrt() + eps))
        rows.append(torch.cat(parts))
    got = FeatureStore(tmp_path / "features" / "epoch-1" / "pool").load("features")
    want = torch.stack(rows)
    # m'/(sqrt(v')+eps) amplifies fp32 rounding where v' is tiny: compare rows at unit scale
    scale = want.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got / scale, want / scale, **TOL)


@pytest.mark.slow
def test_batch_size_and_projection_consistency(warmed, small_data, tmp_path):
    proj = {"projection": ProjectionArgs(kind="sjlt", dim=256, seed=3), "normalize": True}
    extract(warmed, small_data, tmp_path / "a", batch_size=3, **proj)
    extract(warmed, small_data, tmp_path / "b", batch_size=16, **proj)
    for split, key in (("pool", "features"), ("target", "chosen")):
        a = FeatureStore(tmp_path / "a" / "features" / "epoch-1" / split).load(key)
        b = FeatureStore(tmp_path / "b" / "features" / "epoch-1" / split).load(key)
        torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(a.norm(dim=1), torch.ones(a.shape[0]), **TOL)


@pytest.mark.slow
def test_resume_completes_store_without_duplicates(warmed, small_data, tmp_path):
    extract(warmed, small_data, tmp_path, splits=["pool"])
    store = tmp_path / "features" / "epoch-1" / "pool"
    full = FeatureStore(store).load("features")
    # simulate a run killed after two shards: one shard missing, manifest not complete
    (store / "shard-00001.safetensors").unlink()
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
    with pytest.raises(StoreMismatchError, match="incomplete"):
        FeatureStore(store)
    kept = (store / "shard-00000.safetensors").stat().st_mtime_ns
    extract(warmed, small_data, tmp_path, splits=["pool"])
    assert (store / "shard-00000.safetensors").stat().st_mtime_ns == kept  # skipped, not recomputed
    again = FeatureStore(store)
    assert again.load("index").tolist() == list(range(48))
    torch.testing.assert_close(again.load("features"), full, **TOL)


@pytest.mark.slow
def test_mismatched_manifest_is_refused(warmed, small_data, tmp_path):
    extract(warmed, small_data, tmp_path, splits=["pool"])
    with pytest.raises(StoreMismatchError, match=r"projection.kind: recorded 'none', now 'sjlt'"):
        extract(warmed, small_data, tmp_path, splits=["pool"], projection=ProjectionArgs(kind="sjlt", dim=64))
    with pytest.raises(StoreMismatchError, match="preconditioner"):
        extract(warmed, small_data, tmp_path, splits=["pool"], pool_preconditioner="identity")


@pytest.mark.slow
def test_store_readable_without_project_code(warmed, small_data, tmp_path):
    extract(warmed, small_data, tmp_path, splits=["pool"])
    code = (
        "import json, sys, glob\n"
        "from safetensors.numpy import load_file\n"
        f"d = {str(tmp_path / 'features' / 'epoch-1' / 'pool')!r}\n"
        "m = json.load(open(d + '/manifest.json'))\n"
        "rows = [load_file(p) for p in sorted(glob.glob(d + '/shard-*.safetensors'))]\n"
        "n = sum(r['index'].shape[0] for r in rows)\n"
        "assert n == m['rows'] and rows[0]['features'].shape[1] == m['dim']\n"
        "assert 'prism_lightning' not in sys.modules\n"
        "print('ok', n)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.startswith("ok 48")


@pytest.mark.distributed
@pytest.mark.parametrize("shard_size", ["16", "64"])  # 64: one shard per store, so rank 1 predicts nothing
def test_ddp_two_processes_equal_single(warmed, small_data, tmp_path, shard_size):
    common = ["--model.init_args.checkpoint_dir", str(warmed / "warmup"), "--data.pool", str(small_data["pool"]),
              "--data.target", str(small_data["target_pairs"]), "--data.shard_size", shard_size,
              "--data.eval_batch_size", "5", "--model.init_args.projection.dim", "256"]
    for name, extra in (("single", []), ("ddp", ["--trainer.devices", "2", "--trainer.strategy", "ddp"])):
        run_cli(["predict", "--config", "configs/tiny/features.yaml", "--model.init_args.output_dir",
                 str(tmp_path / name), *common, *extra])
    for epoch in (1, 2):
        for split, keys in (("pool", ["features", "loss", "index"]), ("target", ["chosen", "lbar_chosen"])):
            a = FeatureStore(tmp_path / "single" / "features" / f"epoch-{epoch}" / split)
            b = FeatureStore(tmp_path / "ddp" / "features" / f"epoch-{epoch}" / split)
            for key in keys:
                torch.testing.assert_close(a.load(key), b.load(key), **TOL)
