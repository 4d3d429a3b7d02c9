"""Iterative repair on a finished evidence run: remove prism's bottom rows, warm up again on what is left,
re-score, remove as many rows again, fine-tune (docs/evidence.md, "How much to remove").

    .venv/bin/python tools/evidence/iterative.py --config configs/tiny/evidence.yaml --experiment repair_sycophancy

Round 1 is the run's own: ``<run>/<experiment>/seed-<s>/selection/prism/selected.jsonl`` holds the rows prism
kept. Round 2 is the ``pipeline`` command itself, on a config written beside it
(``<run>/<experiment>/seed-<s>/iterative/config.yaml``): the evidence config with that file as the pool, the
same targets, seed and settings, ``modes: [prism]`` and a budget of as many rows as round 1 removed. Its
``full`` fine-tune trains on round 1's kept rows, so it reproduces the run's one-shot prism fine-tune (printed as
a check); its ``prism`` fine-tune is the iterative repair, to compare with the one-shot removal of the same
total (``tools/evidence/budget.py`` at twice the fraction).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from prism_lightning.eval import metrics as M


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny/evidence.yaml", help="the evidence config of the run")
    parser.add_argument("--experiment", default="repair_sycophancy")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    run = Path(config["model"]["init_args"]["output_dir"])
    exp = next(e for e in config["pipeline"]["experiments"] if e["name"] == args.experiment)
    for seed in args.seeds:
        folder = run / args.experiment / f"seed-{seed}"
        kept = folder / "selection" / "prism" / "selected.jsonl"
        n_pool = sum(1 for _ in (folder / "selection" / "prism" / "scores.jsonl").open())
        n_kept = sum(1 for _ in kept.open())
        out = folder / "iterative"
        out.mkdir(parents=True, exist_ok=True)
        round2 = {k: v for k, v in exp.items() if k not in ("clean_pool", "study")}
        round2 |= {"name": "round2", "pool": str(kept), "fraction": (n_pool - n_kept) / n_kept}
        cfg = json.loads(json.dumps(config))
        cfg["model"]["init_args"]["output_dir"] = str(out)
        cfg["pipeline"] |= {"experiments": [round2], "seeds": [seed], "modes": ["prism"], "finetune_modes": None}
        (out / "config.yaml").write_text(f"# written by tools/evidence/iterative.py from {args.config}\n"
                                         + yaml.safe_dump(cfg, sort_keys=False))
        subprocess.run([sys.executable, "-m", "prism_lightning", "pipeline", "--config", str(out / "config.yaml")],
                       check=True)
        key = M.metric_key(exp.get("metric", "exact_match"), exp["subtask"])
        one_shot, again, iterative = (100 * json.loads(f.read_text())[key] for f in (
            folder / "finetune" / "prism" / "metrics-test.json",
            out / "round2" / f"seed-{seed}" / "finetune" / "full" / "metrics-test.json",
            out / "round2" / f"seed-{seed}" / "finetune" / "prism" / "metrics-test.json"))
        print(f"seed {seed}: removed {n_pool - n_kept} + {n_pool - n_kept} rows; one-shot prism {one_shot:.1f} "
              f"(round 2's full, the same rows: {again:.1f}); iterative {iterative:.1f}")


if __name__ == "__main__":
    main()
