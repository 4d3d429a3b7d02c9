"""Every command in README.md and docs/ is checked, so none can go stale.

The commands of the embedded model run as written (docs/usage.md's stages here; README's own-data flow in
test_readme.py; the two README commands are what CI runs). Commands for hub models and GPUs, launchers and
the peers' benchmark cannot run here: their settings are parsed through the real CLI (``--print_config``)
and the scripts they name must exist. A command of a kind this file does not know fails the first test.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKERS = {"slow", "distributed", "heavy"}


def commands() -> list[tuple[str, str]]:
    """(file, command) for every line of every ```bash block, continuations joined, comments dropped."""
    out = []
    for path in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" # ")[0].strip()
                if line and not line.startswith("#"):
                    out.append((path.name, re.sub(r"\s+", " ", line)))
    return out


def kind(command: str) -> str:
    """What the command's last step runs (``bash tools/ops/install.sh && X`` is of X's kind)."""
    last = command.split("&&")[-1].strip()
    if re.match(r"(\.venv/bin/)?python -m prism_lightning ", last):
        return "cli"
    if re.match(r"(\.venv|\.venv-peers)/bin/python -m pytest", last):
        return "pytest"
    if re.match(r"(bash|sbatch) tools/ops/launch/", last):
        return "launch"
    if re.match(r"(bash|\.venv/bin/python|\.venv-peers/bin/python) tools/bench/", last):
        return "bench"
    if re.match(r"(\.venv/bin/)?python tools/evidence/", last):
        return "evidence"  # reads a finished evidence run
    if last.startswith("bash tools/ops/install.sh"):
        return "install"
    return "unknown"


def test_every_documented_command_is_of_a_known_kind():
    found = commands()
    assert len(found) > 20
    unknown = [c for c in found if kind(c[1]) == "unknown"]
    assert not unknown, unknown


def cli_args(command: str) -> list[str]:
    args = shlex.split(command.split("&&")[-1].strip())
    return args[args.index("prism_lightning") + 1:]


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for _, c in commands() if kind(c) == "cli"],
                         ids=lambda c: c[:80])
def test_every_cli_command_parses(command, tmp_path):
    """Its settings parse through the real CLI (a GPU config on CPU here)."""
    args = cli_args(command)
    if "accelerator: gpu" in " ".join((REPO / a).read_text() for a in args if a.endswith(".yaml")):
        args += ["--trainer.accelerator", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "prism_lightning", *args, "--print_config"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (command, out.stderr[-2000:])


@pytest.mark.parametrize("command", [c for _, c in commands() if kind(c) in ("launch", "bench", "pytest", "evidence")],
                         ids=lambda c: c[:80])
def test_launchers_benchmarks_and_test_commands_name_what_exists(command):
    words = shlex.split(command)
    for word in words:
        if word.startswith(("tools/", "configs/", "tests/")):
            assert (REPO / word).exists(), (command, word)
    if "-m" in words and kind(command) == "pytest":
        marks = [i for i, w in enumerate(words) if w == "-m"][1:]  # the first is python's own -m
        expression = words[marks[0] + 1] if marks else ""
        assert set(re.findall(r"[a-z]+", expression)) - {"not", "and", "or"} <= MARKERS, command


@pytest.mark.slow
def test_the_usage_stages_run_as_written(tmp_path):
    """docs/usage.md's stage commands, in order, from a folder whose configs/ are the repository's."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = {k: v for k, v in os.environ.items() if k != "PRISM_DEBUG"} | {"PYTHONPATH": str(REPO)}
    stages = [c for f, c in commands() if f == "usage.md" and kind(c) == "cli"]
    assert [cli_args(c)[0] for c in stages] == ["fit", "predict", "select", "fit", "test"]
    for command in stages:
        out = subprocess.run([sys.executable, "-m", "prism_lightning", *cli_args(command)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, (command, out.stderr[-3000:])
    run = tmp_path / "runs" / "tiny"
    assert (run / "selection" / "prism" / "selected.jsonl").exists()
    assert (run / "finetune" / "prism" / "metrics-test.json").exists()
