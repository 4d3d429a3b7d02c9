"""GPU smoke test: QLoRA warmup, bf16 gradient features and FSDP through the real CLI, plus the feature benchmark.

Run on a GPU machine: ``python tools/ops/gpu_smoke.py`` (about 5 minutes on one H100).
CPU dry run (what the test suite runs): ``python tools/ops/gpu_smoke.py --dry-run``.

For the embedded tiny model and a random-init Llama of about 1B parameters (Llama-3.2-1B
shape, saved with the tiny tokenizer and loaded back through ``from_pretrained``, so nothing is
downloaded) it runs, each through ``prism_lightning.cli.main`` with the tiny configs:

1. ``warmup-qlora``: NF4 base, bf16 compute, LoRA, activation checkpointing, ``bf16-mixed``;
2. ``features-bf16``: ``precision: bf16-true`` per-example gradients, Adam preconditioning,
   sjlt projection to k=8192 (fp32 accumulation) for a 512-row pool and the target pairs;
3. ``warmup-fsdp``: FSDP2 (``fsdp2`` strategy, one GPU) with bf16 compute / fp32 reduce;
4. ``warmup-qlora-fsdp``: the same with the NF4 base (4-bit weights replicated);

and prints rows/s and peak GPU memory per stage, then runs ``tools/bench/bench_features.py`` for the
extraction / training-step ratio. The dry run does the same on CPU, tiny model only, fp32.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from prism_lightning import DEMO_DATA, TINY_MODEL  # noqa: E402
from prism_lightning.cli import main  # noqa: E402


class StepTimer(L.Callback):
    """Rows per second over the train / predict batches after the first ``skip`` (warm-up) ones."""

    def __init__(self, skip: int = 2):
        self.skip, self.rows, self.seconds, self.seen, self._t = skip, 0, 0.0, 0, 0.0

    def _start(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def _end(self, batch):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seen += 1
        if self.seen > self.skip:
            self.rows += int(batch["input_ids"].shape[0])
            self.seconds += time.perf_counter() - self._t

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._end(batch)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._start()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._end(batch)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else float("nan")


def mid_size_llama(folder: Path) -> str:
    """A random-init ~1B Llama (Llama-3.2-1B layer shapes, tiny vocabulary) saved in bf16 with the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = json.loads((Path(TINY_MODEL) / "config.json").read_text())
    config = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=tiny["vocab_size"], max_position_embeddings=2048,
                         bos_token_id=tiny.get("bos_token_id"), eos_token_id=tiny.get("eos_token_id"),
                         pad_token_id=tiny.get("pad_token_id"), tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(TINY_MODEL) / name).exists():
            shutil.copy(Path(TINY_MODEL) / name, folder / name)
    del model
    return str(folder)


def run_stage(args: list[str], fn: str) -> dict:
    """One CLI stage in-process with a ``StepTimer``: rows/s, peak GPU memory, wall seconds."""
    cli = main(args, run=False)
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if fn == "fit":
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    else:
        cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
    return {"rows_per_s": timer.rate, "peak_mb": peak, "seconds": time.perf_counter() - start,
            "trainable": sum(p.numel() for p in cli.model.model.parameters() if p.requires_grad)}


def stages(model: str, out: Path, data: dict, gpu: bool, lora: tuple[int, int], steps: int) -> dict:
    hw = ["--trainer.accelerator", "gpu" if gpu else "cpu", "--trainer.devices", "1", "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    base = ["--model.init_args.model.name_or_path", model, "--model.init_args.model.dtype",
            "bfloat16" if gpu else "float32", "--model.init_args.model.attn_implementation", "sdpa" if gpu else "eager"]
    qlora = ["--model.init_args.model.quantization", "nf4", "--model.init_args.model.gradient_checkpointing", "true"]
    train = [*hw, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(steps),
             "--trainer.limit_val_batches", "0", "--trainer.precision", "bf16-mixed" if gpu else "32-true",
             "--model.init_args.lora.r", str(lora[0]), "--model.init_args.lora.alpha", str(lora[1]),
             "--data.train_on", "pool", "--data.batch_size", "8", "--data.max_length", "256",
             "--data.pool", data["pool"], "--data.target", data["target"]]
    results = {}
    warm = out / "qlora"
    results["warmup-qlora"] = run_stage(["--config", "configs/tiny/warmup.yaml", *train, *base, *qlora,
                                         "--model.init_args.output_dir", str(warm)], "fit")
    results["features-bf16"] = run_stage(
        ["--config", "configs/tiny/features.yaml", *hw, "--trainer.precision", "bf16-true" if gpu else "32-true",
         *base, *qlora, "--model.init_args.checkpoint_dir", str(warm / "warmup"),
         "--model.init_args.output_dir", str(warm), "--model.init_args.projection.dim", "8192",
         "--data.eval_batch_size", "16", "--data.max_length", "256", "--data.pool", data["pool"],
         "--data.target", data["target"]], "predict")
    fsdp = ["--trainer.strategy", "fsdp2", "--model.init_args.fsdp.param_dtype", "bfloat16" if gpu else "float32"]
    if gpu:  # FSDP computes in bf16 through its mixed-precision policy, not autocast
        fsdp += ["--trainer.precision", "32-true"]
    results["warmup-fsdp"] = run_stage(["--config", "configs/tiny/warmup.yaml", *train, *base, *fsdp,
                                        "--model.init_args.output_dir", str(out / "fsdp")], "fit")
    results["warmup-qlora-fsdp"] = run_stage(["--config", "configs/tiny/warmup.yaml", *train, *base, *qlora, *fsdp,
                                              "--model.init_args.output_dir", str(out / "qlora-fsdp")], "fit")
    for name in ("qlora", "fsdp", "qlora-fsdp"):
        assert (out / name / "warmup" / "epoch-1" / "optimizer.safetensors").exists(), name
    assert (warm / "features" / "epoch-1" / "pool" / "manifest.json").exists()
    return results


def main_smoke() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model only, fp32, a few steps")
    parser.add_argument("--models", default="tiny,llama-1b")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        raise SystemExit("no CUDA device: run with --dry-run for the CPU check")
    models = ["tiny"] if args.dry_run else args.models.split(",")
    steps = 3 if args.dry_run else args.steps
    device = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"device: {device}; torch {torch.__version__}; steps {steps}")
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = (Path(DEMO_DATA) / "pool.jsonl").read_text().splitlines()[:512]
        (tmp / "pool.jsonl").write_text("\n".join(rows) + "\n")
        data = {"pool": str(tmp / "pool.jsonl"), "target": str(Path(DEMO_DATA) / "target_pairs.jsonl")}
        for name in models:
            path = TINY_MODEL if name == "tiny" else mid_size_llama(tmp / name)
            lora = (8, 16) if name == "tiny" else (128, 512)
            table[name] = stages(path, tmp / f"run-{name}", data, gpu, lora, steps)
    print(f"\n{'model':<10}{'stage':<19}{'rows/s':>10}{'peak GPU MB':>13}{'seconds':>9}{'trainable':>12}")
    for name, res in table.items():
        for stage, r in res.items():
            print(f"{name:<10}{stage:<19}{r['rows_per_s']:>10.1f}{r['peak_mb']:>13.0f}{r['seconds']:>9.1f}"
                  f"{r['trainable']:>12,}")
    bench = [sys.executable, str(REPO / "tools" / "bench" / "bench_features.py"), "--dim", "8192" if gpu else "256"]
    bench += ["--workloads", "tiny,llama-1b", "--dtype", "bfloat16"] if gpu else ["--quick"]
    print("\n$ " + " ".join(bench[1:]), flush=True)
    subprocess.run(bench, check=True)
    print(json.dumps({"smoke": table}))


if __name__ == "__main__":
    main_smoke()
