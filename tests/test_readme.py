"""The README's "Use your own data" commands, run as written (the interpreter and the run folder substituted)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO


def readme_blocks(section: str) -> list[list[str]]:
    """The commands of each ```bash block of a README section, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", body, flags=re.S)
    return [[c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()] for block in blocks]


@pytest.mark.slow
def test_own_data_flow_runs_as_written(tmp_path):
    blocks = readme_blocks("Use your own data")
    stages, spec = blocks[0], blocks[1]
    assert [c.split()[2:4] for c in stages] == [["prism_lightning", "fit"], ["prism_lightning", "predict"],
                                               ["prism_lightning", "select"], ["prism_lightning", "fit"]]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for command in [*stages, *spec]:
        args = shlex.split(command.replace("runs/mine", str(tmp_path / "mine")))
        assert args[0] == ".venv/bin/python"
        out = subprocess.run([sys.executable, *args[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, (command, out.stderr[-3000:])
    run = tmp_path / "mine"
    scores = [json.loads(x) for x in (run / "selection" / "prism" / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 300 and sum(s["selected"] for s in scores) == 270  # repair: 10% removed
    assert (run / "finetune" / "prism" / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((run / "selection" / "prism" / "manifest.json").read_text())["pool_rows"] == 300
