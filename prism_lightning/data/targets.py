"""Derived target sets: the robustness study's swapped pairs."""

from __future__ import annotations

import json
import random
from pathlib import Path

from prism_lightning.data.formats import read_records
from prism_lightning.io import atomic_write_text


def noisy_targets(src, noise: float, seed: int, dest: Path) -> str:
    """A JSONL copy of the target pairs (any data source) with a seeded ``noise`` share of chosen/rejected swapped.

    Swapped rows get ``"swapped": true`` (read by no stage; for inspection).
    """
    rows = read_records(src)
    rng = random.Random(seed)
    for i in rng.sample(range(len(rows)), round(noise * len(rows))):
        rows[i]["chosen"], rows[i]["rejected"] = rows[i]["rejected"], rows[i]["chosen"]
        rows[i]["swapped"] = True
    atomic_write_text(dest, "".join(json.dumps(r) + "\n" for r in rows))
    return str(dest)
