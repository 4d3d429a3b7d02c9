"""Every YAML under configs/ parses and instantiates (models are built lazily, so no weights load)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prism_lightning.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
SUBCOMMANDS = {"fit", "validate", "test", "predict", "select", "pipeline"}


def test_configs_exist():
    assert any(p.parent.name == "tiny" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses_and_instantiates(path):
    first = path.read_text().splitlines()[0].split()
    assert first[:4] == ["#", "python", "-m", "prism_lightning"], "a config opens with its command"
    assert first[4] in SUBCOMMANDS
    cli = main(["--config", str(path)], run=False)  # run=False: parse + instantiate, no subcommand
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None
