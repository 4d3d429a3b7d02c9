"""What a user can skip: the ranking with features from the last warmup checkpoint only, the last two, or all, and
with all of them against the target side of the last checkpoint only.

    .venv/bin/python tools/evidence/checkpoints.py --run runs/evidence

Reads a finished evidence run (``configs/tiny/evidence.yaml``) and re-scores each repair experiment's pool from
its feature stores with ``selection.epochs`` restricted, or ``selection.target_checkpoint: last`` (the ``select``
stage's own code, ``run_selection``, into ``<run>/checkpoints/<experiment>/seed-N/<setting>``). Prints, per
experiment and setting, the within-skill AUROC (mean ± std over seeds) of each mode and the feature-stage seconds
the setting needs (the run's feature stage time shared by its checkpoints, and within one by the sequences of each
side: a pool row is one, a target pair two), and writes them as JSON to ``<run>/checkpoints.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from prism_lightning.config import SelectionArgs
from prism_lightning.data.formats import PoolIndex, load_pairs
from prism_lightning.select import run_selection

SETTINGS = {"last": ([3], "each"), "last two": ([2, 3], "each"), "all three": ([1, 2, 3], "each"),
            "all three, target side at the last": ([1, 2, 3], "last")}


def measure(folder: Path, out: Path, modes: list[str], epochs: list[int], target: str) -> dict:
    settings = json.loads((folder / "selection" / "stage.json").read_text())["settings"]
    exp, data = settings["experiment"], settings["data"]
    args = SelectionArgs(task=exp["kind"], fraction=exp["fraction"], seed=settings["seed"], epochs=epochs,
                         target_checkpoint=target, plots=False, explain=0)
    pool = PoolIndex.scan(data["pool"], label=args.label)
    targets = load_pairs(data["target"])
    summary = run_selection(folder / "features", out, modes, args, pool, targets, force=True)  # its own scratch
    seconds = json.loads((folder / "features" / "stage.json").read_text())["seconds"]
    checkpoints = len(list((folder / "features").glob("epoch-*")))
    per_checkpoint, target_share = seconds / checkpoints, 2 * len(targets) / (pool.rows + 2 * len(targets))
    targets_at = 1 if target == "last" else len(epochs)
    return {"auroc": {m: r["within_subtask"]["auroc"] for m, r in summary["ranking_metrics"]["modes"].items()},
            "feature_seconds": per_checkpoint * (len(epochs) * (1 - target_share) + targets_at * target_share)}


def fmt(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/evidence", help="a finished evidence run")
    parser.add_argument("--experiments", nargs="+", default=["repair_sycophancy", "repair_mistake_math"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["prism", "less", "loss"])
    args = parser.parse_args()
    run, results, lines = Path(args.run), {}, []
    for exp in args.experiments:
        results[exp] = {name: [measure(run / exp / f"seed-{s}", run / "checkpoints" / exp / f"seed-{s}" / "_".join(
            name.replace(",", "").split()), args.modes, epochs, target) for s in args.seeds]
            for name, (epochs, target) in SETTINGS.items()}
        lines += [f"### {exp}", "", "| checkpoints | " + " | ".join(args.modes) + " | feature stage (s) |",
                  "| --- |" + " --- |" * (len(args.modes) + 1)]
        for name, seeds in results[exp].items():
            cells = [fmt([s["auroc"][m] for s in seeds]) for m in args.modes]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt([s['feature_seconds'] for s in seeds])} |")
        lines.append("")
    print("\n".join(lines))
    (run / "checkpoints.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
