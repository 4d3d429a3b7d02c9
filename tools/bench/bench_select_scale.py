"""The select stage at scale: peak RSS stays flat as the pool grows; rows/s on 1 and N processes.

Run: ``python tools/bench/bench_select_scale.py --rows 100000,2000000 --dim 1024`` (for each size, writes a
synthetic bf16 feature store of ``rows x dim x 2`` bytes and a JSONL pool under ``--dir``, then runs the
whole selection in a fresh process). ``--quick`` is a small dry run (20,000 rows).

``--processes 1,2`` runs each selection once per process count under ``torch.distributed.run`` (gloo, one
thread per process): every process hashes and scores its block of the store's shards and rank 0 writes
(``select.run_selection``, as ``python -m prism_lightning select`` under ``torchrun``). It prints the
scoring phase's rows/s (hash + score + choose, the part that splits over processes), the whole stage's,
and the ratio to one process, measured side by side in one run.

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
    """``pool.jsonl``, ``target.jsonl`` and synthetic ``features/epoch-1/{pool,target}`` stores that record them as
    their source; returns the pool store's size in bytes. 5% of the pool rows of skill ``b`` are marked harmful."""
    from prism_lightning.data.formats import PoolIndex, load_pairs, rows_digest

    root.mkdir(parents=True, exist_ok=True)
    with open(root / "pool.jsonl", "w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"id": f"row-{i:08d}", "prompt": f"What is {i % 97}+{i % 89}?",
                                 "completion": str(i % 97 + i % 89), "subtask": "ab"[i % 2],
                                 "harmful": i % 2 == 1 and i % 40 == 1}) + "\n")
    with open(root / "target.jsonl", "w") as fh:
        for i in range(pairs):
            fh.write(json.dumps({"id": f"t{i}", "prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    sources = {"pool": PoolIndex.scan(root / "pool.jsonl").digest,
               "target": rows_digest(load_pairs(root / "target.jsonl"))}
    files = {"pool": str((root / "pool.jsonl").resolve()), "target": str((root / "target.jsonl").resolve())}
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
                    "projection": {"kind": "sjlt", "dim": dim, "seed": 0}, "source_sha256": sources[split],
                    "source": files[split]}
        mark_complete(folder, settings, -(-n // size))
    return sum(p.stat().st_size for p in (root / "features" / "epoch-1" / "pool").glob("*"))


def select(root: Path, chunk_rows: int) -> dict:
    """The selection stage on the files under ``root`` (this process's share under ``torchrun``): its time, its
    scoring phase's, and this process's peak RSS."""
    import os

    import torch.distributed as dist

    from prism_lightning.config import SelectionArgs
    from prism_lightning.data.formats import PoolIndex, load_pairs
    from prism_lightning.ranks import Ranks
    from prism_lightning.select import run_selection

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    start = time.perf_counter()
    args = SelectionArgs(task="repair", fraction=0.05, chunk_rows=chunk_rows, plots=False)
    pool = PoolIndex.scan(root / "pool.jsonl", label=args.label)
    summary = run_selection(root / "features", root / "selection", MODES, args, pool,
                            load_pairs(root / "target.jsonl"), force=True, ranks=Ranks.current())
    secs = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dist.is_initialized():
        dist.destroy_process_group()
    with open(root / "selection" / "prism" / "scores.jsonl") as fh:
        assert sum(1 for _ in fh) == pool.rows
    return {"rows": pool.rows, "seconds": secs, "score_seconds": summary["seconds"]["score"], "peak_rss_mb": peak}


def run_select(root: Path, chunk_rows: int, processes: int, threads: int) -> dict:
    """The selection in fresh processes (``processes`` of them under ``torch.distributed.run``); rank 0's result."""
    import os

    cmd = [__file__, "--select-only", "--chunk-rows", str(chunk_rows), "--dir", str(root)]
    if processes > 1:
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", "29731", *cmd]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    found = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,2000000", help="pool sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--chunk-rows", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(BYTES))
    parser.add_argument("--dir", default="runs/bench-select-scale")
    parser.add_argument("--quick", action="store_true", help="20,000 rows x k=1024 (a dry run)")
    parser.add_argument("--processes", default=None,
                        help="process counts to compare, e.g. 1,2 (one thread each); default: one process with the "
                             "machine's threads")
    parser.add_argument("--select-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.dim, args.shard_size, args.chunk_rows = "20000", 1024, 2048, 4096
    if args.select_only:  # child process: its peak RSS is the selection's alone
        result = select(Path(args.dir), args.chunk_rows)
        import os

        if os.environ.get("RANK", "0") == "0":
            print(json.dumps(result))
        return
    b, results = BYTES[args.dtype], []
    print(f"k={args.dim} dtype={args.dtype} shard_size={args.shard_size} chunk_rows={args.chunk_rows} "
          f"threads={torch.get_num_threads()} modes={','.join(MODES)}")
    for rows in (int(r) for r in args.rows.split(",")):
        root = Path(args.dir) / f"rows-{rows}"
        start = time.perf_counter()
        size = write_inputs(root, rows, args.dim, args.shard_size, args.dtype)
        written = time.perf_counter() - start
        counts = [int(p) for p in args.processes.split(",")] if args.processes else [None]
        runs = {}
        for procs in counts:
            runs[procs] = run_select(root, args.chunk_rows, procs or 1, 1 if procs else torch.get_num_threads())
        res = runs[counts[0]]
        formula = (args.shard_size * args.dim * b + min(args.chunk_rows, args.shard_size) * args.dim * 8
                   + rows * (len(MODES) + 2) * 8) / 2**20
        print(f"rows={rows:>10,}  store {size / 2**30:6.2f} GiB (written in {written:.0f} s)  "
              f"select {res['seconds']:6.1f} s = {rows / res['seconds']:>9,.0f} rows/s  "
              f"peak RSS {res['peak_rss_mb']:6.0f} MiB  "
              f"(formula's streamed + per-row part {formula:.0f} MiB)")
        record = {"rows": rows, "store_bytes": size, "select_seconds": res["seconds"],
                  "rows_per_s": rows / res["seconds"], "peak_rss_mb": res["peak_rss_mb"]}
        if args.processes:
            base = runs[counts[0]]
            for procs, r in runs.items():
                print(f"  {procs} process(es) x 1 thread: scoring {r['score_seconds']:6.2f} s = "
                      f"{rows / r['score_seconds']:>10,.0f} rows/s ({base['score_seconds'] / r['score_seconds']:.2f}x "
                      f"{counts[0]} process), whole stage {r['seconds']:6.2f} s = {rows / r['seconds']:>9,.0f} rows/s "
                      f"({base['seconds'] / r['seconds']:.2f}x), rank 0 peak RSS {r['peak_rss_mb']:.0f} MiB")
            record["processes"] = {str(p): {"score_rows_per_s": rows / r["score_seconds"],
                                            "rows_per_s": rows / r["seconds"]} for p, r in runs.items()}
        results.append(record)
        shutil.rmtree(root)
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(f"peak RSS {last['peak_rss_mb']:.0f} MiB at {last['rows']:,} rows vs {first['peak_rss_mb']:.0f} MiB at "
              f"{first['rows']:,}: x{last['peak_rss_mb'] / first['peak_rss_mb']:.2f} "
              f"for x{last['rows'] / first['rows']:.0f} rows")
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
