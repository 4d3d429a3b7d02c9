"""Shared fixtures and the single numerical tolerance used by every exactness test."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from prism_lightning import DEMO_DATA, TINY_MODEL

# One tolerance for every "equals brute force" comparison in fp32.
TOL = {"atol": 1e-5, "rtol": 1e-4}
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# in-process CLI calls raise the project's errors (the tests of the one-line output unset it)
os.environ.setdefault("PRISM_DEBUG", "1")
os.environ.setdefault("PRISM_CACHE", tempfile.mkdtemp(prefix="prism-cache-"))  # tokenization cache of this session
torch.set_num_threads(min(2, torch.get_num_threads()))


def _untracked() -> set[str]:
    """Files in the repository that git does not track (ignored ones included), but for caches and venvs."""
    import subprocess

    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPO,
                         capture_output=True, text=True)
    skip = (".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".egg-info", ".venv-peers")
    return {line[3:] for line in out.stdout.splitlines()
            if line[:2] in ("??", "!!") and not any(part in line for part in skip)}


@pytest.fixture(scope="session", autouse=True)
def repository_stays_clean():
    """No test writes into the repository: runs, checkpoints and configs go to temporary folders."""
    before = _untracked()
    yield
    written = sorted(_untracked() - before)
    assert not written, f"tests wrote into the repository: {written[:10]}"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    return TINY_MODEL


@pytest.fixture(scope="session")
def demo_data() -> Path:
    return Path(DEMO_DATA)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, demo_data) -> dict[str, Path]:
    """A small slice of the demo data: 48 pool rows over all skills, 12 pairs, 24 eval rows."""
    folder = tmp_path_factory.mktemp("small-data")
    out = {}
    for name, n_per in [("pool", 8), ("target_pairs", 2), ("eval", 4), ("eval_pairs", 2)]:
        rows = [json.loads(x) for x in (demo_data / f"{name}.jsonl").read_text().splitlines()]
        by_sub: dict[str, list] = {}
        for r in rows:
            by_sub.setdefault(r["subtask"], []).append(r)
        keep = [r for sub in sorted(by_sub) for r in by_sub[sub][:n_per]]
        out[name] = write_jsonl(folder / f"{name}.jsonl", keep)
    return out


def warmup_run(root: Path, data: dict[str, Path], epochs: int = 2, force: bool = False, **lora) -> Path:
    """Train a tiny LoRA warmup in-process (no CLI) and return the run root."""
    import lightning as L

    from prism_lightning.config import LoraArgs, ModelArgs, OptimArgs
    from prism_lightning.data import PrismDataModule
    from prism_lightning.modules import WarmupModule

    L.seed_everything(0, verbose=False)
    dm = PrismDataModule(tokenizer=TINY_MODEL, pool=str(data["pool"]), target=str(data["target_pairs"]), eval_sft=None,
                         eval_pairs=None, train_on="pool", batch_size=8, max_length=64)
    module = WarmupModule(model=ModelArgs(), lora=LoraArgs(**({"r": 4, "alpha": 8, "dropout": 0.0} | lora)),
                          optim=OptimArgs(lr=2e-3), output_dir=str(root), force=force)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    return root


@pytest.fixture(scope="session")
def warmed(tmp_path_factory, small_data) -> Path:
    """A 2-epoch LoRA warmup on the small data (shared by feature and scoring tests)."""
    return warmup_run(tmp_path_factory.mktemp("warm"), small_data)


def run_cli(args: list[str], extra_path: str | None = None, timeout: int = 600, threads: int | None = None) -> None:
    """``python -m prism_lightning ARGS`` in a subprocess (needed for DDP); fails with its stderr.

    ``threads`` sets ``OMP_NUM_THREADS`` (1 for multi-process runs, so 2 ranks do not oversubscribe 2 cores).
    """
    import subprocess
    import sys

    path = os.pathsep.join(p for p in (str(REPO), extra_path) if p)
    env = dict(os.environ, PYTHONPATH=path, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    out = subprocess.run([sys.executable, "-m", "prism_lightning", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]


def run_processes(commands: list[tuple[list[str], dict]], timeout: int = 600) -> None:
    """Start every ``(argv, env)`` at once (the ranks of one job), wait for all, fail with a failing one's stderr.

    Output goes to files, not pipes: a rank blocked on a full pipe while another waits for it at a barrier
    would hang the job.
    """
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        procs, logs = [], []
        for i, (argv, env) in enumerate(commands):
            log = open(Path(tmp) / f"rank-{i}.log", "w+")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
        try:
            for p in procs:
                p.wait(timeout=timeout)
        finally:
            for p in procs:
                p.kill() if p.poll() is None else None
        for p, log in zip(procs, logs):
            log.seek(0)
            out = log.read()
            log.close()
            assert p.returncode == 0, out[-4000:]


def hf_train(root: Path, pool: Path, epochs: int = 2, **arguments) -> Path:
    """LoRA SFT of the tiny model with ``transformers.Trainer`` (``arguments`` override ``TrainingArguments``);
    ``PrismReferenceCallback`` writes ``root/callback/epoch-N/`` as it goes; the Trainer's checkpoints go to
    ``root/hf``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from prism_lightning.data import PrismDataModule
    from prism_lightning.data.tokenize import Encoded, pad_batch
    from prism_lightning.hf_warmup import PrismReferenceCallback

    dm = PrismDataModule(tokenizer=TINY_MODEL, pool=str(pool), target=None, eval_sft=None, eval_pairs=None,
                         max_length=64)
    dm.load()
    rows = [{"input_ids": e.input_ids, "prompt_len": e.prompt_len} for e in dm.pool_encoded]

    def collate(items):
        batch = pad_batch([Encoded(i["input_ids"], i["prompt_len"]) for i in items], dm.tok.pad_token_id)
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(TINY_MODEL),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    settings = {"output_dir": str(root / "hf"), "num_train_epochs": epochs, "per_device_train_batch_size": 8,
                "learning_rate": 2e-3, "logging_steps": 1, "save_strategy": "epoch", "report_to": [], "use_cpu": True,
                "remove_unused_columns": False, "seed": 0, "disable_tqdm": True} | arguments
    Trainer(model=model, args=TrainingArguments(**settings), train_dataset=rows, data_collator=collate,
            callbacks=[PrismReferenceCallback(root / "callback")]).train()
    return root


@pytest.fixture(scope="session")
def hf_run(tmp_path_factory, small_data):
    """Two epochs with transformers.Trainer, every step's learning rate logged."""
    return hf_train(tmp_path_factory.mktemp("hf"), small_data["pool"])
