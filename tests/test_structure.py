"""The package's shape: every module imports on its own, imports point one way, registries drive the choices."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
from conftest import REPO

import prism_lightning

MODULES = sorted(m.name for m in pkgutil.walk_packages(prism_lightning.__path__, "prism_lightning."))


IMPORT_EACH = """
import importlib, os, sys
import torch, lightning, transformers, peft, datasets  # third-party libraries only: no project module is loaded
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:  # a child with none of the project's modules imported yet
        try:
            importlib.import_module(name)
        except BaseException as err:
            sys.stderr.write(f"{name}: {type(err).__name__}: {err}\\n")
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1]:
        failed.append(name)
print(failed)
"""


def test_every_module_imports_on_its_own():
    """Each module imports in a process where no other project module was imported first (a fork of one
    interpreter that loaded only the third-party libraries, so the check takes seconds, not minutes)."""
    out = subprocess.run([sys.executable, "-c", IMPORT_EACH, *MODULES], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-3000:])
    assert len(MODULES) >= 40


def _module_imports(name: str) -> set[str]:
    """prism_lightning modules imported at module level (not inside functions) by module ``name``."""
    spec = importlib.util.find_spec(name)
    tree = ast.parse(Path(spec.origin).read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prism_lightning"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("prism_lightning")}
    return {m for m in found if m in MODULES or m == "prism_lightning"} - {name}


def test_no_module_level_import_cycle():
    graph = {m: _module_imports(m) for m in MODULES}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path, m, dep]))
            if dep not in state:
                visit(dep, [*path, m])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [])


def test_settings_module_is_import_light():
    """config.py (the CLI's settings) pulls in neither Lightning, transformers, peft nor datasets."""
    code = ("import sys, prism_lightning.config; "
            "print(sorted(m for m in ('lightning', 'transformers', 'peft', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_choices_are_derived_from_the_registries():
    from prism_lightning.config import Experiment, PipelineArgs
    from prism_lightning.influence.preconditioners import PRECONDITIONERS, PreconditionerName
    from prism_lightning.influence.scoring import GRADIENT_MODES, MODES, ModeName
    from prism_lightning.modeling import DTYPES

    assert set(get_args(PreconditionerName)) == set(PRECONDITIONERS) >= {"adam", "adam_no_momentum", "identity", "sgd"}
    assert list(get_args(ModeName)) == list(MODES) and PipelineArgs().modes == list(MODES)
    assert tuple(m for m in MODES if MODES[m].parts is not None) == GRADIENT_MODES
    assert all((MODES[m].parts is None) != (MODES[m].scores is None) for m in MODES)  # exactly one way to score
    from prism_lightning.config import DType

    assert set(get_args(DType)) == set(DTYPES)
    fields = {f.name: f.type for f in dataclasses.fields(Experiment)}
    assert "PreconditionerName" in str(fields["pool_preconditioner"])


def test_no_reference_outside_the_repository():
    """The method is cited from the project's own docs/method.md, never from a file outside the repository."""
    assert (REPO / "docs" / "method.md").exists()
    assert "docs/method.md" in (REPO / "README.md").read_text()
    for path in (REPO / "prism_lightning").rglob("*.py"):
        text = path.read_text()
        assert "METHOD.md" not in text and "../shared" not in text, path
