"""Scoring a large pool streams its feature shards: peak RAM stays near ``chunk_rows x k``, not ``rows x k``.

Run: ``python tools/bench_select_scale.py --rows 1000000 --dim 8192`` (writes a synthetic store of
``rows x dim x 2`` bytes in bf16 under ``--dir``, then scores it). ``--quick`` is a small dry run.

It writes random unit-norm pool features and 64 target pairs as a feature store (the format the
predict stage writes), then runs ``compute_scores`` for ``prism`` and ``less`` in a fresh process,
and prints the store size, the scoring time, and the scoring process's peak RSS next to the
cost formula of README "Scaling out":

    store bytes      = rows x k x bytes(store_dtype)        per checkpoint (+ 8 bytes/row of loss, index)
    scoring RAM      ~ shard_size x k x bytes               (one shard read from disk)
                     + min(chunk_rows, shard_size) x k x 8  (its float64 chunk)
                     + rows x (directions + 2) x 8          (float64 scores, norms)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from prism_lightning.store.feature_store import mark_complete, write_shard

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def write_store(root: Path, rows: int, dim: int, shard: int, dtype: str, pairs: int = 64) -> int:
    """Synthetic ``epoch-1/{pool,target}`` stores; returns the pool store's size on disk in bytes."""
    gen = torch.Generator().manual_seed(0)
    for split, n in (("pool", rows), ("target", pairs)):
        folder = root / "epoch-1" / split
        shutil.rmtree(folder, ignore_errors=True)
        size = shard if split == "pool" else n
        for s in range(0, (n + size - 1) // size):
            idx = torch.arange(s * size, min((s + 1) * size, n))

            def feats(m: int) -> torch.Tensor:
                f = torch.randn(m, dim, generator=gen)
                return (f / f.norm(dim=1, keepdim=True)).to(getattr(torch, dtype))

            if split == "pool":
                tensors = {"index": idx, "features": feats(len(idx)), "loss": torch.rand(len(idx), generator=gen)}
            else:
                tensors = {"index": idx, "chosen": feats(len(idx)), "rejected": feats(len(idx)),
                           "lbar_chosen": -torch.rand(len(idx), generator=gen),
                           "lbar_rejected": -torch.rand(len(idx), generator=gen)}
            write_shard(folder, s, tensors)
        settings = {"format": 1, "split": split, "rows": n, "dim": dim, "shard_size": size, "lr_mean": 1e-4,
                    "dtype": dtype, "model": "synthetic", "normalize": True, "epoch": 1, "adapter_sha256": "synthetic",
                    "projection": {"kind": "sjlt", "dim": dim, "seed": 0}}
        mark_complete(folder, settings, -(-n // size))
    return sum(p.stat().st_size for p in (root / "epoch-1" / "pool").glob("*"))


def score(root: Path, rows: int, chunk_rows: int) -> dict:
    from prism_lightning.config import SelectionArgs
    from prism_lightning.data.formats import PairRow
    from prism_lightning.select import compute_scores

    targets = [PairRow(id=str(i), prompt="", chosen="a", rejected="b", subtask="t") for i in range(64)]
    start = time.perf_counter()
    args = SelectionArgs(chunk_rows=chunk_rows, verify=False)  # scoring alone; the hash check is a separate read
    scores, _, _ = compute_scores(root, ["prism", "less"], args, range(rows), targets)
    secs = time.perf_counter() - start
    assert all(len(s) == rows and torch.isfinite(s).all() for s in scores.values())
    return {"seconds": secs, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--chunk-rows", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(BYTES))
    parser.add_argument("--dir", default="runs/bench-select-scale")
    parser.add_argument("--quick", action="store_true", help="20,000 rows x k=1024 (a dry run)")
    parser.add_argument("--score-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.dim, args.shard_size, args.chunk_rows = 20_000, 1024, 2048, 4096
    root = Path(args.dir)
    if args.score_only:  # child process: its peak RSS is the scoring's alone
        print(json.dumps(score(root, args.rows, args.chunk_rows)))
        return
    start = time.perf_counter()
    size = write_store(root, args.rows, args.dim, args.shard_size, args.dtype)
    written = time.perf_counter() - start
    cmd = [sys.executable, __file__, "--score-only", "--rows", str(args.rows), "--chunk-rows", str(args.chunk_rows),
           "--dir", str(root)]
    res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    b = BYTES[args.dtype]
    formula_store = args.rows * args.dim * b
    formula_ram = (args.shard_size * args.dim * b + min(args.chunk_rows, args.shard_size) * args.dim * 8
                   + args.rows * (2 + 2) * 8)
    print(f"rows={args.rows:,} k={args.dim} dtype={args.dtype} chunk_rows={args.chunk_rows} "
          f"threads={torch.get_num_threads()}")
    print(f"pool store on disk: {size / 2**30:.2f} GiB (formula rows x k x {b} B = {formula_store / 2**30:.2f} GiB), "
          f"written in {written:.0f} s")
    print(f"scoring prism+less: {res['seconds']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MiB "
          f"(streamed part by formula: {formula_ram / 2**20:.0f} MiB; store / peak RSS = "
          f"{size / 2**20 / res['peak_rss_mb']:.1f}x)")
    print(json.dumps({"store_bytes": size, "score_seconds": res["seconds"], "peak_rss_mb": res["peak_rss_mb"]}))
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
