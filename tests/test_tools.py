"""The tools: committed demo data is what the seeded generator makes; the benchmark's dry run works."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import build_demo_data  # noqa: E402


def test_committed_demo_data_matches_generator(demo_data):
    files = build_demo_data.build()
    assert files == build_demo_data.build()  # seeded: same rows every time
    for name, rows in files.items():
        committed = [json.loads(x) for x in (demo_data / name).read_text().splitlines()]
        assert committed == rows, name


def test_demo_data_properties(demo_data):
    files = build_demo_data.build()
    pool_prompts = {r["prompt"] for r in files["pool.jsonl"]}
    assert len({r["subtask"] for r in files["pool.jsonl"]}) >= 4
    for name in ("target_pairs.jsonl", "eval.jsonl"):  # targets and evaluation rows are not in the pool
        assert not pool_prompts & {r["prompt"] for r in files[name]}
    for name, skill in (("pool_mistake_math.jsonl", "add"), ("pool_sycophancy.jsonl", "check")):
        harmful = [r for r in files[name] if r["harmful"]]
        assert harmful and {r["subtask"] for r in harmful} == {skill}
        assert 0.05 <= len(harmful) / len(files[name]) <= 0.12
    for r in files["pool_sycophancy.jsonl"]:
        if r["harmful"]:
            assert r["completion"].startswith("Yes,")


@pytest.mark.slow
def test_bench_features_quick():
    out = subprocess.run([sys.executable, "tools/bench_features.py", "--quick", "--dim", "256"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "extraction throughput" in out.stdout
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["tiny"]["extract_vs_bs1_loop"] > 1


@pytest.mark.slow
def test_bench_select_scale_quick(tmp_path):
    out = subprocess.run([sys.executable, "tools/bench_select_scale.py", "--quick", "--dir", str(tmp_path / "s")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["store_bytes"] >= 20_000 * 1024 * 2 and summary["peak_rss_mb"] > 0


@pytest.mark.slow
def test_gpu_smoke_cpu_dry_run():
    out = subprocess.run([sys.executable, "tools/gpu_smoke.py", "--dry-run"], cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    smoke = json.loads(out.stdout.strip().splitlines()[-1])["smoke"]["tiny"]
    assert set(smoke) == {"warmup-qlora", "features-bf16", "warmup-fsdp", "warmup-qlora-fsdp"}
    assert all(r["rows_per_s"] > 0 for r in smoke.values())
