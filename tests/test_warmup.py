"""The tiny model loads like a hub model; warmup trains and saves complete reference checkpoints."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import TOL, warmup_run
from safetensors.torch import load_file

from prism_lightning import TINY_MODEL
from prism_lightning.config import LoraArgs, ModelArgs, OptimArgs
from prism_lightning.data import PrismDataModule
from prism_lightning.modeling import build_model
from prism_lightning.modules import WarmupModule


def test_tiny_model_loads_through_auto_classes(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    assert model.config.model_type == "llama"
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 2e7
    printable = "".join(chr(c) for c in range(32, 127))
    assert tok.decode(tok(printable, add_special_tokens=False)["input_ids"]) == printable


@pytest.mark.slow
def test_warmup_loss_decreases_and_checkpoints_are_complete(warmed, small_data):
    folders = sorted((warmed / "warmup").glob("epoch-*"))
    assert [f.name for f in folders] == ["epoch-1", "epoch-2"]
    infos = []
    for folder in folders:
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors",
                "checkpoint.json"} <= names
        info = json.loads((folder / "checkpoint.json").read_text())
        assert info["lr_mean"] > 0 and info["epoch_steps"] == 6 and info["lora"]["r"] == 4
        infos.append(info)
        model = build_model(ModelArgs(), LoraArgs(), adapter_path=folder)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        moments = load_file(str(folder / "optimizer.safetensors"))
        assert set(moments) == {f"{n}.{m}" for n in params for m in ("exp_avg", "exp_avg_sq")}
        for n, p in params.items():
            assert moments[f"{n}.exp_avg"].shape == p.shape
        adapter = load_file(str(folder / "adapter_model.safetensors"))
        assert len(adapter) == len(params)
    assert infos[1]["global_step"] == 12 and infos[1]["lr_mean"] < infos[0]["lr_mean"]
    assert infos[0]["adapter_sha256"] != infos[1]["adapter_sha256"]


def _mean_loss(adapter, data) -> float:
    model = build_model(ModelArgs(), LoraArgs(r=4, alpha=8, dropout=0.0), adapter_path=adapter).eval()
    dm = PrismDataModule(tokenizer=TINY_MODEL,
                         pool=str(data["pool"]), target=None, eval_sft=None, eval_pairs=None, train_on="pool")
    dm.setup("fit")
    from prism_lightning.influence.objective import mean_logprob

    losses = []
    with torch.no_grad():
        for batch in dm.train_dataloader():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            losses.append(-mean_logprob(logits, batch["labels"]))
    return torch.cat(losses).mean().item()


@pytest.mark.slow
def test_warmup_lowers_pool_loss(warmed, small_data, tmp_path):
    L.seed_everything(0)
    fresh = build_model(ModelArgs(), LoraArgs(r=4, alpha=8, dropout=0.0))
    fresh.save_pretrained(str(tmp_path / "init"))
    before = _mean_loss(tmp_path / "init", small_data)
    after = _mean_loss(warmed / "warmup" / "epoch-2", small_data)
    assert after < 0.95 * before, (before, after)


@pytest.mark.slow
def test_qlora_warmup_runs_on_cpu(tmp_path, small_data):
    pytest.importorskip("bitsandbytes")
    L.seed_everything(0)
    dm = PrismDataModule(tokenizer=TINY_MODEL,
                         pool=str(small_data["pool"]), target=None, eval_sft=None, eval_pairs=None,
                         train_on="pool", batch_size=8)
    module = WarmupModule(model=ModelArgs(quantization="nf4"), lora=LoraArgs(r=4, alpha=8, dropout=0.0),
                          optim=OptimArgs(lr=2e-3), output_dir=str(tmp_path))
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.model.modules())
    assert (tmp_path / "warmup" / "epoch-1" / "optimizer.safetensors").exists()


@pytest.mark.slow
def test_resume_from_lightning_checkpoint(tmp_path, small_data):
    root = warmup_run(tmp_path / "run", small_data, epochs=1)
    last = root / "warmup" / "lightning" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["optimizer_states"] and all("lora_" in k for k in state["state_dict"])
    dm = PrismDataModule(tokenizer=TINY_MODEL,
                         pool=str(small_data["pool"]), target=None, eval_sft=None, eval_pairs=None,
                         train_on="pool", batch_size=8)
    module = WarmupModule(model=ModelArgs(), lora=LoraArgs(r=4, alpha=8, dropout=0.0),
                          optim=OptimArgs(lr=2e-3), output_dir=str(root))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=dm, ckpt_path=str(last))
    assert trainer.global_step == 12
    info = json.loads((root / "warmup" / "epoch-2" / "checkpoint.json").read_text())
    assert info["epoch"] == 2 and info["global_step"] == 12


@pytest.mark.slow
def test_full_finetune_warmup_saves_weights_and_moments(tmp_path, small_data):
    L.seed_everything(0)
    dm = PrismDataModule(tokenizer=TINY_MODEL,
                         pool=str(small_data["pool"]), target=None, eval_sft=None, eval_pairs=None,
                         train_on="pool", batch_size=16)
    module = WarmupModule(model=ModelArgs(), lora=LoraArgs(enabled=False), optim=OptimArgs(lr=1e-4),
                          output_dir=str(tmp_path))
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    folder = tmp_path / "warmup" / "epoch-1"
    weights = load_file(str(folder / "model.safetensors"))
    moments = load_file(str(folder / "optimizer.safetensors"))
    n_params = sum(1 for p in module.model.parameters() if p.requires_grad)
    assert len(weights) == n_params and len(moments) == 2 * n_params
    # one call loads the full fine-tune and its tokenizer, as any Hugging Face model folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(folder))
    trained = dict(module.model.named_parameters())
    for name, value in loaded.named_parameters():
        torch.testing.assert_close(value, trained[name].detach(), atol=0, rtol=0)
    assert AutoTokenizer.from_pretrained(str(folder))("What is 2+3?")["input_ids"]


@pytest.mark.slow
def test_merge_adapter_matches_the_adapter_model(warmed, tmp_path):
    """``merge_adapter``: base + (alpha / r) B A folded into the weights gives the adapter model's logits."""
    from transformers import AutoModelForCausalLM

    from prism_lightning.modeling import merge_adapter

    adapter = warmed / "warmup" / "epoch-2"
    merged_dir = merge_adapter(ModelArgs(), adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    peft_model = build_model(ModelArgs(), LoraArgs(), adapter_path=adapter, trainable=False).eval()
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(ModelArgs().name_or_path).eval()(input_ids=ids).logits
    scale = want.abs().max()  # logits reach ~10: W + BA vs xW + xAB differ by rounding, compare on a unit scale
    assert not torch.allclose(want / scale, base / scale, **TOL)  # the adapter changes the model
    torch.testing.assert_close(got / scale, want / scale, **TOL)
