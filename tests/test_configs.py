"""Every YAML under configs/ parses and instantiates through the real CLI (the stage itself is
replaced by a recorder; models are built lazily in ``configure_model``, so no weights load).

Hub models (no download here) are built on the meta device from their architecture
(``tests/architectures/<name>.json``, the hub's config.json fields): parameter count as published,
LoRA size as the formula gives, and the decoder layers FSDP shards one by one."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO

from prism_lightning import cli as cli_module
from prism_lightning.cli import main, parse_settings
from prism_lightning.stages import LIGHTNING_COMMANDS, STAGES, standalone_commands
from prism_lightning.trainer import PrismTrainer

ARCHITECTURES = Path(__file__).resolve().parent / "architectures"
PUBLISHED_PARAMS = {"Llama-3.1-8B": 8.03e9, "Qwen3-8B": 8.19e9, "Qwen3-14B": 14.77e9}
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
COMMANDS = {*LIGHTNING_COMMANDS, "pipeline", *(s.command for s in STAGES.values())}


def test_configs_exist_for_every_stage_of_the_table():
    assert any(p.parent.name == "tiny" for p in CONFIGS)
    for spec in STAGES.values():
        assert spec.config is None or (REPO / spec.config).exists(), spec.name
        assert spec.config is None or command_of(REPO / spec.config) == spec.command, spec.name


def command_of(path: Path) -> str:
    first = path.read_text().splitlines()[0].split()
    assert first[:4] == ["#", "python", "-m", "prism_lightning"], "a config opens with its command"
    return first[4]


def run_config(path: Path, monkeypatch) -> tuple:
    """The CLI on ``path`` with the subcommand's stage replaced by a recorder: (cli or settings, recorded calls)."""
    sub = command_of(path)
    assert sub in COMMANDS
    calls = []
    standalone = standalone_commands().get(sub)
    if standalone is not None:  # its own parser: the settings instance it builds
        return parse_settings(standalone.settings, ["--config", str(path)], sub), calls
    if sub in PrismTrainer.extra_subcommands():
        @functools.wraps(getattr(PrismTrainer, sub))  # keep the signature the CLI parses
        def record(self, **kwargs):
            calls.append(kwargs)

        monkeypatch.setattr(PrismTrainer, sub, record)
    else:  # a Lightning command: record the trainer call
        monkeypatch.setattr(PrismTrainer, sub, lambda self, model, datamodule=None, **kw: calls.append(
            {"model": model, "datamodule": datamodule, **kw}))
    # the recorder runs nothing, so it takes no lock (which would create the config's output folder here)
    monkeypatch.setattr(cli_module, "run_lock", lambda folder: contextlib.nullcontext(folder))
    args = [sub, "--config", str(path)]
    if "accelerator: gpu" in path.read_text() and not torch.cuda.is_available():
        args += ["--trainer.accelerator", "cpu"]  # GPU configs still parse and build their objects
    return main(args), calls


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses_and_instantiates(path, monkeypatch):
    cli, calls = run_config(path, monkeypatch)
    spec = standalone_commands().get(command_of(path))
    if spec is not None:
        assert isinstance(cli, spec.settings)
        return
    assert len(calls) == 1 and calls[0]["model"] is cli.model and calls[0]["datamodule"] is cli.datamodule
    assert isinstance(cli.trainer, PrismTrainer)


def lora_size(cfg, r: int, targets: list[str]) -> int:
    """``r x (in + out)`` summed over the targeted attention projections of every layer."""
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head, cfg.num_key_value_heads * head
    shapes = {"q_proj": (cfg.hidden_size, q), "k_proj": (cfg.hidden_size, kv), "v_proj": (cfg.hidden_size, kv),
              "o_proj": (q, cfg.hidden_size)}
    return cfg.num_hidden_layers * sum(r * sum(shapes[t]) for t in targets)


def check_on_meta(module) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from prism_lightning.sharding import decoder_layers

    name = module.model_args.name_or_path.split("/")[-1]
    fields = json.loads((ARCHITECTURES / f"{name}.json").read_text())
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total / PUBLISHED_PARAMS[name] - 1) < 0.005, (name, total)
    lora = getattr(module, "lora_args", None)
    if lora is not None:
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=list(lora.target_modules)))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == lora_size(cfg, lora.r, list(lora.target_modules))
    assert len(decoder_layers(model)) == cfg.num_hidden_layers


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name != "tiny"],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
@pytest.mark.slow
def test_hub_model_configs_build_on_meta(path, monkeypatch):
    cli, _ = run_config(path, monkeypatch)
    check_on_meta(cli.model)
    if "strategy: fsdp2" in path.read_text():
        from prism_lightning.sharding import FSDP2Strategy

        assert isinstance(cli.trainer.strategy, FSDP2Strategy) and cli.trainer.num_nodes == 2
