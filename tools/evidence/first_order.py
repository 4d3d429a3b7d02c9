"""The first-order study of docs/evidence.md: does each mode's target direction raise the margin of held-out
target pairs, and does prism's (pi-weighted) beat prism_uniform's?

    .venv/bin/python tools/evidence/first_order.py --run runs/evidence

Reads a finished evidence run (``configs/tiny/evidence.yaml``): per experiment and seed, the last warmup
checkpoint, the data settings the run used (``warmup/stage.json``; the noisy targets for ``noise_*``) and each
mode's scores. Held-out pairs: the run's ``eval_pairs`` of the experiment's subtask (never target pairs).
Measures, per mode (``prism_lightning.eval.first_order``): the slope of the held-out margin along the mode's
direction, its change after a step of 1% of the adapter's norm, and its change after one epoch of AdamW on the
mode's top ``--fraction`` of the pool (lr and batch of the evidence fine-tunes). Prints markdown tables (mean ±
std over seeds, and prism - prism_uniform per seed) and writes them as JSON to ``<run>/first_order.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import fields
from pathlib import Path

import torch

from prism_lightning.config import Columns, DataArgs, LoraArgs, ModelArgs
from prism_lightning.data.datamodule import PrismDataModule
from prism_lightning.eval.first_order import (
    directions,
    lora_parameters,
    pair_gradients,
    slope,
    step_gain,
    train_gain,
)
from prism_lightning.modeling import build_model

DIRECTION_MODES = ["prism", "prism_uniform", "prism_no_anchor", "less", "ifguide"]
TRAIN_MODES = [*DIRECTION_MODES, "random", "loss"]


def last_checkpoint(warmup: Path) -> Path:
    return max((p for p in warmup.glob("epoch-*") if (p / "checkpoint.json").exists()),
               key=lambda p: int(p.name.split("-")[1]))


def top_rows(scores: Path, index: dict[str, int], fraction: float) -> list[int]:
    """Pool indices of a mode's top ``fraction`` by score (rank 1 is the highest), in pool order."""
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    k = max(1, round(fraction * len(rows)))
    return sorted(index[r["id"]] for r in rows if r["rank"] <= k)


def measure(folder: Path, args: argparse.Namespace) -> dict:
    settings = json.loads((folder / "warmup" / "stage.json").read_text())["settings"]
    ckpt = last_checkpoint(folder / "warmup")
    info = json.loads((ckpt / "checkpoint.json").read_text())
    model = build_model(ModelArgs(**info["model"]), LoraArgs(**info["lora"]), adapter_path=ckpt, trainable=True)
    model.eval()
    names = {f.name for f in fields(DataArgs)} - {"selection", "selection_file", "eval_sft"}
    data = {k: (Columns(**v) if k.endswith("columns") and v else v) for k, v in settings["data"].items() if k in names}
    dm = PrismDataModule(**data, eval_sft=None)
    dm.connect(tokenizer=info["model"]["name_or_path"])
    dm.load()
    pad = dm.tok.pad_token_id
    subtask = settings["experiment"]["subtask"]
    held_idx = [i for i, r in enumerate(dm.eval_pair_rows) if subtask is None or r.subtask == subtask]
    held = ([dm.eval_pair_encoded[0][i] for i in held_idx], [dm.eval_pair_encoded[1][i] for i in held_idx])
    tc, tr = dm.target_encoded
    chosen, rejected, pi = pair_gradients(model, [tc[i] for i in range(len(tc))], [tr[i] for i in range(len(tr))], pad)
    dirs = directions(DIRECTION_MODES, chosen, rejected, pi)
    size = args.step * float(torch.cat([p.detach().reshape(-1) for p in lora_parameters(model)]).norm())
    index = {r.id: i for i, r in enumerate(dm.pool_rows)}
    out = {"checkpoint": ckpt.name, "held_out_pairs": len(held_idx), "target_pairs": len(tc),
           "pi_mean": float(pi.mean()), "pi_below_0.3": float((pi < 0.3).double().mean()), "modes": {}}
    for mode in TRAIN_MODES:
        row = {}
        if mode in dirs:
            row["slope"] = slope(model, held, dirs[mode], pad)
            row["step"] = step_gain(model, held, dirs[mode], size, pad)
        scores = folder / "selection" / mode / "scores.jsonl"
        if scores.exists():
            rows = top_rows(scores, index, args.fraction)
            row["train"] = train_gain(model, [dm.pool_encoded[i] for i in rows], held, pad, args.lr, args.batch)
        out["modes"][mode] = row
    return out


def fmt(values: list[float], sign: str = "+") -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:{sign}.4f}"
    return f"{statistics.mean(values):{sign}.4f} ± {statistics.stdev(values):.4f}"


def table(results: dict) -> str:
    lines = []
    for exp, seeds in results.items():
        first = next(iter(seeds.values()))
        lines += [f"### {exp}", "",
                  f"pi mean {fmt([s['pi_mean'] for s in seeds.values()], '')}, share of pairs with pi < 0.3 "
                  f"{fmt([s['pi_below_0.3'] for s in seeds.values()], '')}; {first['target_pairs']} target pairs, "
                  f"{first['held_out_pairs']} held-out pairs, {first['checkpoint']}", "",
                  "| mode | slope of held-out margin | after a step (1% of adapter norm) "
                  "| after 1 epoch on its top rows |",
                  "| --- | --- | --- | --- |"]
        for mode in TRAIN_MODES:
            cells = [fmt([s["modes"][mode][k] for s in seeds.values() if k in s["modes"][mode]])
                     for k in ("slope", "step", "train")]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        diffs = {k: [s["modes"]["prism"][k] - s["modes"]["prism_uniform"][k] for s in seeds.values()]
                 for k in ("slope", "step", "train")}
        lines.append("| prism - prism_uniform | " + " | ".join(
            f"{fmt(v)} ({sum(x > 0 for x in v)}/{len(v)} seeds > 0)" for v in diffs.values()) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/evidence", help="a finished evidence run")
    parser.add_argument("--experiments", nargs="+",
                        default=["noise_sycophancy_00", "noise_sycophancy_20", "noise_sycophancy_40",
                                 "repair_mistake_math", "forward_backwards"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fraction", type=float, default=0.05, help="top share of the pool each mode trains on")
    parser.add_argument("--lr", type=float, default=0.003, help="AdamW learning rate (the evidence fine-tunes')")
    parser.add_argument("--batch", type=int, default=4, help="rows per step (the evidence fine-tunes')")
    parser.add_argument("--step", type=float, default=0.01, help="finite step, as a share of the adapter's norm")
    args = parser.parse_args()
    torch.manual_seed(0)
    run, results, start = Path(args.run), {}, time.perf_counter()
    for exp in args.experiments:
        results[exp] = {seed: measure(run / exp / f"seed-{seed}", args) for seed in args.seeds}
    text = table(results)
    print(text)
    print(f"({time.perf_counter() - start:.0f} s)")
    (run / "first_order.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
