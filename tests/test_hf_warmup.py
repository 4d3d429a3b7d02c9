"""A warmup done with transformers.Trainer, imported from its checkpoints and written by the callback."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from prism_lightning import TINY_MODEL
from prism_lightning.cli import main
from prism_lightning.config import ProjectionArgs
from prism_lightning.data import PrismDataModule
from prism_lightning.errors import DataFormatError
from prism_lightning.modules import GradientFeatureModule
from prism_lightning.store.feature_store import FeatureStore


@pytest.mark.slow
def test_imported_warmup_equals_the_callbacks(hf_run, small_data, tmp_path):
    main(["import-warmup", "--source", str(hf_run / "hf"), "--dest", str(tmp_path / "imported")])
    for epoch in (1, 2):
        got, want = tmp_path / "imported" / f"epoch-{epoch}", hf_run / "callback" / f"epoch-{epoch}"
        a, b = load_file(str(got / "optimizer.safetensors")), load_file(str(want / "optimizer.safetensors"))
        assert a.keys() == b.keys() and len(a) == 4 * 2 * 2 * 2  # 4 layers x (q, v) x (A, B) x (m, v)
        assert all(torch.equal(a[k], b[k]) for k in a)
        ga, gb = load_file(str(got / "adapter_model.safetensors")), load_file(str(want / "adapter_model.safetensors"))
        assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
        info, cb = (json.loads((f / "checkpoint.json").read_text()) for f in (got, want))
        assert info["global_step"] == cb["global_step"] == 6 * epoch and info["betas"] == cb["betas"]
        assert info["lr_mean"] == cb["lr_mean"] > 0 and info["lr_source"] == "schedule"
    # the feature stage reads both the same way and gets the same features
    stores = {}
    for name, folder in (("imported", tmp_path / "imported"), ("callback", hf_run / "callback")):
        dm = PrismDataModule(tokenizer=TINY_MODEL,
                             pool=str(small_data["pool"]), target=str(small_data["target_pairs"]), eval_sft=None,
                             eval_pairs=None, max_length=64, eval_batch_size=16, shard_size=16)
        module = GradientFeatureModule(checkpoint_dir=str(folder), output_dir=str(tmp_path / name), epochs=[2],
                                       projection=ProjectionArgs(kind="sjlt", dim=128), pool_preconditioner="adam")
        L.Trainer(accelerator="cpu", inference_mode=False, logger=False, enable_progress_bar=False,
                  enable_model_summary=False).predict(module, datamodule=dm, return_predictions=False)
        stores[name] = FeatureStore(tmp_path / name / "features" / "epoch-2" / "pool").load("features")
    assert stores["imported"].abs().sum() > 0
    torch.testing.assert_close(stores["imported"], stores["callback"], atol=0, rtol=0)


def test_import_refuses_a_folder_without_checkpoints(tmp_path):
    from prism_lightning.hf_warmup import import_warmup

    with pytest.raises(DataFormatError, match=r"no checkpoint-<step> folder with optimizer.pt"):
        import_warmup(str(tmp_path), str(tmp_path / "out"))


@pytest.mark.slow
def test_default_logging_imports_the_right_learning_rates(small_data, tmp_path, capsys, monkeypatch):
    """With the Trainer's default logging_steps=500 no step's rate is logged: each checkpoint's mean rate is rebuilt
    from the run's schedule, equal to what the callback saw step by step; without training_args.bin, refused."""
    from conftest import hf_train

    run = hf_train(tmp_path / "run", small_data["pool"], logging_steps=500, warmup_steps=2)
    main(["import-warmup", "--source", str(run / "hf"), "--dest", str(tmp_path / "imported")])
    for epoch in (1, 2):
        got, want = (json.loads((f / f"epoch-{epoch}" / "checkpoint.json").read_text())
                     for f in (tmp_path / "imported", run / "callback"))
        assert got["lr_mean"] == pytest.approx(want["lr_mean"], rel=1e-12) and got["lr_mean"] > 0
    assert got["lr_mean"] < json.loads((tmp_path / "imported" / "epoch-1" / "checkpoint.json").read_text())["lr_mean"]
    for ck in (run / "hf").glob("checkpoint-*"):
        (ck / "training_args.bin").unlink()
    monkeypatch.delenv("PRISM_DEBUG", raising=False)
    with pytest.raises(SystemExit):
        main(["import-warmup", "--source", str(run / "hf"), "--dest", str(tmp_path / "again")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no training_args.bin and no logged learning rate for steps [1, 2, 3" in err and "logging_steps=1" in err


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_adamw_states_import_dequantized(optim, small_data, tmp_path):
    """bitsandbytes' AdamW 8-bit, paged 8-bit and paged 32-bit, as QLoRA runs use them: the saved states import,
    equal to the live ones the callback read; after one step they are Adam's moments within 8-bit error."""
    from conftest import hf_train

    run = hf_train(tmp_path / "bnb", small_data["pool"], epochs=1, optim=optim)
    main(["import-warmup", "--source", str(run / "hf"), "--dest", str(tmp_path / "imported")])
    got = load_file(str(tmp_path / "imported" / "epoch-1" / "optimizer.safetensors"))
    want = load_file(str(run / "callback" / "epoch-1" / "optimizer.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    one = hf_train(tmp_path / "one", small_data["pool"], epochs=1, optim=optim, max_steps=1, save_strategy="steps",
                   save_steps=1)
    ref = hf_train(tmp_path / "ref", small_data["pool"], epochs=1, optim="adamw_torch", max_steps=1,
                   save_strategy="steps", save_steps=1)
    for name, folder in (("one", one), ("ref", ref)):  # one step: the Trainer's checkpoint-1, imported
        main(["import-warmup", "--source", str(folder / "hf"), "--dest", str(tmp_path / f"{name}-warmup")])
    a = load_file(str(tmp_path / "one-warmup" / "epoch-1" / "optimizer.safetensors"))
    b = load_file(str(tmp_path / "ref-warmup" / "epoch-1" / "optimizer.safetensors"))
    for key in b:
        err = (a[key] - b[key]).norm() / b[key].norm().clamp_min(1e-30)
        assert err < (0.05 if "8bit" in optim else 1e-5), (key, float(err))
