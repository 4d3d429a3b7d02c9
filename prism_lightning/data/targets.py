"""Derived target sets: the robustness study's swapped pairs."""

from __future__ import annotations

import json
import random
from pathlib import Path

from prism_lightning.io import atomic_write_text


def noisy_targets(src: str | Path, noise: float, seed: int, dest: Path) -> str:
    """A copy of the target pairs (JSONL) with a seeded ``noise`` share of chosen/rejected swapped.

    Swapped rows get ``"swapped": true`` (read by no stage; for inspection).
    """
    rows = [json.loads(x) for x in Path(src).read_text().splitlines() if x.strip()]
    rng = random.Random(seed)
    for i in rng.sample(range(len(rows)), round(noise * len(rows))):
        rows[i]["chosen"], rows[i]["rejected"] = rows[i]["rejected"], rows[i]["chosen"]
        rows[i]["swapped"] = True
    atomic_write_text(dest, "".join(json.dumps(r) + "\n" for r in rows))
    return str(dest)
