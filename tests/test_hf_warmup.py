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
        assert info["lr_mean"] > 0 and info["lr_source"] == "logged"
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
