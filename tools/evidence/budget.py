"""Repair fine-tunes at other budgets, or from fewer warmup checkpoints, on a finished evidence run: the budget
curve and the fast path of docs/evidence.md.

    .venv/bin/python tools/evidence/budget.py --run runs/evidence --experiment repair_sycophancy \\
        --modes prism loss random --fractions 0.025 0.05 0.1 0.2
    .venv/bin/python tools/evidence/budget.py --run runs/evidence --experiment repair_sycophancy \\
        --modes prism --fractions 0.05 --checkpoints 3 2,3

Per seed, a fine-tune takes the run's own ``finetune/prism/stage.json`` settings (model, LoRA with the seed's
initialisation, optimiser, data, epochs, learning rate) and replaces only ``data.selection``: the mode, the
share of the pool removed and the warmup checkpoints scored (default: all). The data module computes that
selection from the run's feature stores, as in any ``fit``; training and evaluation are the pipeline's
(``seed_everything(seed)``, ``FinetuneModule``, the evidence config's trainer settings), so the run's own 5%
fine-tunes are reproduced exactly (checked on one seed: 23.4% agreement both ways); the run's own fine-tune is
read instead where the budget and checkpoints are the run's. Each fine-tune lives in
``<run>/<experiment>/seed-<s>/budget/<name>/`` and is reused when there; the table (behaviour, and the
share of the full-vs-clean gap recovered, both from the run's ``full`` and ``oracle`` fine-tunes) is printed
and written to ``<run>/<experiment>/budget.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import fields
from pathlib import Path

import lightning as L

from prism_lightning import quiet
from prism_lightning.config import Columns, DataArgs, DataSelection, LoraArgs, ModelArgs, OptimArgs
from prism_lightning.data.datamodule import PrismDataModule
from prism_lightning.eval import metrics as M
from prism_lightning.modules import FinetuneModule


def data_module(data: dict, selection: dict) -> PrismDataModule:
    names = {f.name for f in fields(DataArgs)}
    kw = {k: (Columns(**v) if k.endswith("columns") and v else v) for k, v in data.items() if k in names}
    return PrismDataModule(**(kw | {"selection": DataSelection(**selection)}))


def finetune(folder: Path, settings: dict, seed: int, selection: dict) -> tuple[dict, float]:
    """Train and evaluate one repair fine-tune (reused if ``folder`` holds its metrics); its metrics and seconds."""
    out = folder / "metrics-test.json"
    if out.exists():
        return json.loads(out.read_text()), float("nan")
    start = time.perf_counter()
    s = settings
    L.seed_everything(seed, verbose=False)
    module = FinetuneModule(model=ModelArgs(**s["model"]), lora=LoraArgs(**s["lora"]),
                            optim=OptimArgs(**(s["optim"] | {"lr": s["lr"], "betas": tuple(s["optim"]["betas"])})),
                            output_dir=str(folder.parent), run_name=folder.name)
    dm = data_module(s["data"], selection)
    dm.connect(tokenizer=s["model"]["name_or_path"])
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, max_epochs=s["epochs"],
                        enable_checkpointing=False, limit_val_batches=0, default_root_dir=str(folder))
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    return json.loads(out.read_text()), time.perf_counter() - start


def value(metrics: dict, metric: str, subtask: str) -> float:
    return 100 * metrics[M.metric_key(metric, subtask)]


def fmt(values: list[float], digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/evidence", help="a finished evidence run")
    parser.add_argument("--experiment", default="repair_sycophancy", help="a repair experiment of that run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["prism", "loss", "random"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.025, 0.05, 0.1, 0.2],
                        help="shares of the pool removed")
    parser.add_argument("--checkpoints", nargs="+", default=["all"],
                        help="warmup checkpoints scored, e.g. 3 or 2,3 (all: every one)")
    args = parser.parse_args()
    quiet.configure(verbose=False)
    root = Path(args.run) / args.experiment
    exp = json.loads((root / f"seed-{args.seeds[0]}" / "finetune" / "prism" / "stage.json").read_text())
    exp = exp["settings"]["experiment"]
    metric, subtask = exp["metric"], exp["subtask"]
    lower = metric == "unwanted"
    rows, seconds = [], []
    reference = {}
    for seed in args.seeds:
        folder = root / f"seed-{seed}"
        settings = json.loads((folder / "finetune" / "prism" / "stage.json").read_text())["settings"]
        reference[seed] = {name: value(json.loads((folder / "finetune" / name / "metrics-test.json").read_text()),
                                       metric, subtask) for name in ("full", "oracle")}
        for ckpt in args.checkpoints:
            epochs = None if ckpt == "all" else [int(e) for e in ckpt.split(",")]
            for mode in args.modes:
                for fraction in args.fractions:
                    name = f"{mode}-{fraction:g}-{ckpt.replace(',', '_')}"
                    own = folder / "finetune" / mode / "metrics-test.json"  # the run's own fine-tune of this mode
                    if fraction == exp["fraction"] and ckpt == "all" and own.exists():
                        rows.append({"seed": seed, "mode": mode, "fraction": fraction, "checkpoints": ckpt,
                                     "value": value(json.loads(own.read_text()), metric, subtask)})
                        continue
                    selection = settings["data"]["selection"] | {
                        "mode": mode, "fraction": fraction, "epochs": epochs,
                        "output_dir": str(folder / "budget" / name / "selection")}
                    m, sec = finetune(folder / "budget" / name, settings, seed, selection)
                    if sec == sec:
                        seconds.append(sec)
                    rows.append({"seed": seed, "mode": mode, "fraction": fraction, "checkpoints": ckpt,
                                 "value": value(m, metric, subtask)})
    print(f"{args.experiment}: {metric} on {subtask} (%, {'lower' if lower else 'higher'} is better); "
          "gap recovered = (full - run) / (full - clean)")
    full = [reference[s]["full"] for s in args.seeds]
    clean = [reference[s]["oracle"] for s in args.seeds]
    print(f"full pool {fmt(full)}, clean pool {fmt(clean)}")
    print("| mode | removed | checkpoints | behaviour | gap recovered |")
    print("|---|---|---|---|---|")
    table = []
    for ckpt in args.checkpoints:
        for mode in args.modes:
            for fraction in args.fractions:
                vals = {r["seed"]: r["value"] for r in rows
                        if (r["mode"], r["fraction"], r["checkpoints"]) == (mode, fraction, ckpt)}
                gap = [(reference[s]["full"] - v) / (reference[s]["full"] - reference[s]["oracle"])
                       for s, v in vals.items()]
                table.append({"mode": mode, "fraction": fraction, "checkpoints": ckpt, "values": vals,
                              "gap_recovered": gap})
                print(f"| {mode} | {fraction:.1%} | {ckpt} | {fmt(list(vals.values()))} | "
                      f"{fmt([100 * g for g in gap], 0)}% |")
    if seconds:
        print(f"({len(seconds)} fine-tunes, {statistics.mean(seconds):.0f} s each)")
    out = root / "budget.json"
    old = json.loads(out.read_text()) if out.exists() else {"rows": []}
    keep = [r for r in old["rows"] if (r["mode"], r["fraction"], r["checkpoints"], r["seed"])
            not in {(x["mode"], x["fraction"], x["checkpoints"], x["seed"]) for x in rows}]
    out.write_text(json.dumps({"metric": metric, "subtask": subtask, "reference": reference,
                               "rows": keep + rows, "table": table}, indent=2))


if __name__ == "__main__":
    main()
