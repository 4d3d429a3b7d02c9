"""Every YAML under configs/ parses and instantiates through the real CLI (the stage itself is
replaced by a recorder; models are built lazily in ``configure_model``, so no weights load)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from prism_lightning.cli import main
from prism_lightning.trainer import PrismTrainer

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
SUBCOMMANDS = {"fit", "validate", "test", "predict", "select", "pipeline"}


def test_configs_exist():
    assert any(p.parent.name == "tiny" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses_and_instantiates(path, monkeypatch):
    first = path.read_text().splitlines()[0].split()
    assert first[:4] == ["#", "python", "-m", "prism_lightning"], "a config opens with its command"
    sub = first[4]
    assert sub in SUBCOMMANDS
    calls = []

    @functools.wraps(getattr(PrismTrainer, sub))  # keep the signature the CLI parses
    def record(self, **kwargs):
        calls.append(kwargs)

    monkeypatch.setattr(PrismTrainer, sub, record)
    args = [sub, "--config", str(path)]
    if "accelerator: gpu" in path.read_text() and not torch.cuda.is_available():
        args += ["--trainer.accelerator", "cpu"]  # GPU configs still parse and build their objects
    cli = main(args)
    assert len(calls) == 1 and calls[0]["model"] is cli.model and calls[0]["datamodule"] is cli.datamodule
    assert isinstance(cli.trainer, PrismTrainer)
