"""The select stage at scale: peak RSS stays flat as the pool grows, and rows/s.

Run: ``python tools/bench_select_scale.py --rows 100000,2000000 --dim 1024`` (for each size, writes a
synthetic bf16 feature store of ``rows x dim x 2`` bytes and a JSONL pool under ``--dir``, then runs the
whole selection in a fresh process). ``--quick`` is a small dry run (20,000 rows).

What runs is what ``python -m prism_lightning select`` runs after parsing: ``PoolIndex.scan`` of the pool
file (one streamed pass: ids, subtasks, labels, digest; no tokenization), the stores' sha256 check,
streamed scoring of ``prism``, ``less``, ``loss`` and ``random``, ranking, and every output file written
row by row (``scores.jsonl``, ``selected.jsonl`` per mode, ranking metrics). Per pool row the process keeps
a few numbers per mode; the formula of README "Scaling out":

    store bytes   = rows x k x bytes(store_dtype)                per checkpoint
    selection RAM ~ shard_size x k x bytes + chunk x k x 8       (one shard and its float64 chunk)
                  + rows x (3 modes' scores + ranks + 2) x 8     (what grows with the pool)
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
MODES = ["prism", "less", "loss", "random"]


def write_inputs(root: Path, rows: int, dim: int, shard: int, dtype: str, pairs: int = 64) -> int:
    """Synthetic ``features/epoch-1/{pool,target}`` stores, ``pool.jsonl`` and ``target.jsonl``; returns the
    pool store's size in bytes. 5% of the pool rows of skill ``b`` are marked harmful."""
    gen = torch.Generator().manual_seed(0)
    for split, n in (("pool", rows), ("target", pairs)):
        folder = root / "features" / "epoch-1" / split
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
    with open(root / "pool.jsonl", "w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"id": f"row-{i:08d}", "prompt": f"What is {i % 97}+{i % 89}?",
                                 "completion": str(i % 97 + i % 89), "subtask": "ab"[i % 2],
                                 "harmful": i % 2 == 1 and i % 40 == 1}) + "\n")
    with open(root / "target.jsonl", "w") as fh:
        for i in range(pairs):
            fh.write(json.dumps({"id": f"t{i}", "prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    return sum(p.stat().st_size for p in (root / "features" / "epoch-1" / "pool").glob("*"))


def select(root: Path, chunk_rows: int) -> dict:
    """The selection stage on the files under ``root``; its time and this process's peak RSS."""
    from prism_lightning.config import SelectionArgs
    from prism_lightning.data.formats import PoolIndex, load_pairs
    from prism_lightning.select import run_selection

    start = time.perf_counter()
    args = SelectionArgs(task="repair", fraction=0.05, chunk_rows=chunk_rows, plots=False)
    pool = PoolIndex.scan(root / "pool.jsonl", label=args.label)
    run_selection(root / "features", root / "selection", MODES, args, pool, load_pairs(root / "target.jsonl"))
    secs = time.perf_counter() - start
    with open(root / "selection" / "prism" / "scores.jsonl") as fh:
        assert sum(1 for _ in fh) == pool.rows
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": pool.rows, "seconds": secs, "peak_rss_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,2000000", help="pool sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--chunk-rows", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(BYTES))
    parser.add_argument("--dir", default="runs/bench-select-scale")
    parser.add_argument("--quick", action="store_true", help="20,000 rows x k=1024 (a dry run)")
    parser.add_argument("--select-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.dim, args.shard_size, args.chunk_rows = "20000", 1024, 2048, 4096
    if args.select_only:  # child process: its peak RSS is the selection's alone
        print(json.dumps(select(Path(args.dir), args.chunk_rows)))
        return
    b, results = BYTES[args.dtype], []
    print(f"k={args.dim} dtype={args.dtype} shard_size={args.shard_size} chunk_rows={args.chunk_rows} "
          f"threads={torch.get_num_threads()} modes={','.join(MODES)}")
    for rows in (int(r) for r in args.rows.split(",")):
        root = Path(args.dir) / f"rows-{rows}"
        start = time.perf_counter()
        size = write_inputs(root, rows, args.dim, args.shard_size, args.dtype)
        written = time.perf_counter() - start
        cmd = [sys.executable, __file__, "--select-only", "--chunk-rows", str(args.chunk_rows), "--dir", str(root)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        res = json.loads(out.stdout.strip().splitlines()[-1])
        formula = (args.shard_size * args.dim * b + min(args.chunk_rows, args.shard_size) * args.dim * 8
                   + rows * (len(MODES) + 2) * 8) / 2**20
        print(f"rows={rows:>10,}  store {size / 2**30:6.2f} GiB (written in {written:.0f} s)  "
              f"select {res['seconds']:6.1f} s = {rows / res['seconds']:>9,.0f} rows/s  "
              f"peak RSS {res['peak_rss_mb']:6.0f} MiB  "
              f"(formula's streamed + per-row part {formula:.0f} MiB)")
        results.append({"rows": rows, "store_bytes": size, "select_seconds": res["seconds"],
                        "rows_per_s": rows / res["seconds"], "peak_rss_mb": res["peak_rss_mb"]})
        shutil.rmtree(root)
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(f"peak RSS {last['peak_rss_mb']:.0f} MiB at {last['rows']:,} rows vs {first['peak_rss_mb']:.0f} MiB at "
              f"{first['rows']:,}: x{last['peak_rss_mb'] / first['peak_rss_mb']:.2f} "
              f"for x{last['rows'] / first['rows']:.0f} rows")
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
