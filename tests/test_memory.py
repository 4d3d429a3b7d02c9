"""Memory bounded by the batch, not the pool: peak RSS of whole CLI stages at two pool sizes."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


def grow_pool(src: Path, rows: int, dest: Path) -> Path:
    """``rows`` pool rows cycling through ``src``'s, with fresh ids."""
    base = [json.loads(x) for x in src.read_text().splitlines()]
    with open(dest, "w") as fh:
        for i in range(rows):
            fh.write(json.dumps(dict(base[i % len(base)], id=f"r{i}")) + "\n")
    return dest


def peak_rss_mb(args: list[str]) -> float:
    """Peak RSS (MB) of ``python -m prism_lightning ARGS`` run alone in a child process."""
    code = ("import resource, runpy, sys; sys.argv = ['prism_lightning', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('prism_lightning', run_name='__main__')\nfinally:\n"
            "    print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    kb = [int(line.split()[1]) for line in out.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    assert resource.RUSAGE_SELF is not None and kb
    return kb[-1] / 1024


@pytest.mark.slow
def test_predict_memory_stays_flat_as_the_pool_grows(warmed, small_data, tmp_path):
    """2,000 vs 20,000 pool rows through `predict` (k=2048 features: 160 MB for 20,000 rows if kept)."""
    peaks = {}
    for rows in (2_000, 20_000):
        pool = grow_pool(small_data["pool"], rows, tmp_path / f"pool-{rows}.jsonl")
        out = tmp_path / f"run-{rows}"
        peaks[rows] = peak_rss_mb([
            "predict", "--config", "configs/tiny/features.yaml", "--trainer.default_root_dir", str(out),
            "--model.init_args.output_dir", str(out), "--model.init_args.checkpoint_dir", str(warmed / "warmup"),
            "--model.init_args.epochs", "[2]", "--model.init_args.splits", "[pool]",
            "--model.init_args.projection.dim", "2048", "--data.pool", str(pool), "--data.target", "null",
            "--data.eval_batch_size", "128", "--data.shard_size", "1024"])
        assert json.loads((out / "features" / "epoch-2" / "pool" / "manifest.json").read_text())["rows"] == rows
    print(f"predict peak RSS: {peaks[2_000]:.0f} MB at 2,000 rows, {peaks[20_000]:.0f} MB at 20,000 rows")
    assert peaks[20_000] <= 1.10 * peaks[2_000], peaks
