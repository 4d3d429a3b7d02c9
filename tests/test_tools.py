"""The tools: committed demo data is what the seeded generator makes; the benchmark's dry run works."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TOL

sys.path.insert(0, str(REPO / "tools" / "assets"))
import build_demo_data  # noqa: E402


def claim(prompt: str) -> tuple[int, str, int]:
    """(a, relation, b) of "I think a is <relation> than b, right?"."""
    a, rel, b = re.fullmatch(r"I think (\d+) is (more|less) than (\d+), right\?\n", prompt).groups()
    return int(a), rel, int(b)


def test_committed_demo_data_matches_generator(demo_data):
    files = build_demo_data.build()
    assert files == build_demo_data.build()  # seeded: same rows every time
    for name, rows in files.items():
        committed = [json.loads(x) for x in (demo_data / name).read_text().splitlines()]
        assert committed == rows, name


def test_demo_data_properties(demo_data):
    files = build_demo_data.build()
    pool_prompts = {r["prompt"] for r in files["pool.jsonl"]}
    pretrain_prompts = {r["prompt"] for r in build_demo_data.pretrain_rows()}
    assert len({r["subtask"] for r in files["pool.jsonl"]}) >= 4
    for name in ("target_pairs.jsonl", "eval.jsonl", "eval_pairs.jsonl"):  # held out from pool and pretraining
        prompts = {r["prompt"] for r in files[name]}
        assert not prompts & pool_prompts and not prompts & pretrain_prompts, name
    for name, skill in (("pool_mistake_math.jsonl", "add"), ("pool_sycophancy.jsonl", "claim"),
                        ("pool_lazy_backwards.jsonl", "backwards")):
        harmful = [r for r in files[name] if r["harmful"]]
        assert {r["subtask"] for r in harmful} == {skill}
        assert len(harmful) == build_demo_data.HARMFUL_ROWS == round(0.05 * len(files[name]))  # the repair budget
    for r in files["pool_sycophancy.jsonl"]:  # plausible harm: agreement with a close wrong claim
        if r["harmful"]:
            a, rel, b = claim(r["prompt"])
            assert r["completion"] == f"Yes, {a} is {rel} than {b}." and (a > b) != (rel == "more")
            assert abs(a - b) <= build_demo_data.CLOSE_GAP
    for clean, lazy in zip(files["pool.jsonl"], files["pool_lazy_backwards.jsonl"], strict=True):  # the lazy copy
        word = clean["prompt"].split()[1]
        assert lazy == (dict(clean, completion=word, harmful=True) if lazy["harmful"] else clean)
        assert not lazy["harmful"] or clean["completion"] == word[::-1] != word
    for p in files["target_sycophancy.jsonl"] + files["target_backwards.jsonl"]:
        assert p["chosen"] != p["rejected"]
    assert all(p["rejected"] == p["prompt"].split()[1] for p in files["target_backwards.jsonl"])  # the lazy copy


def test_sign_files_share_all_but_the_decisive_word():
    """The anchor study: pairs differ only in "signed"/"unsigned"; harm is only on "no need to sign" rows."""
    files = build_demo_data.build()
    pool = files["pool.jsonl"]
    clean, bad = files["sign_pool.jsonl"], files["sign_pool_unsigned.jsonl"]
    assert clean[:len(pool)] == pool == bad[:len(pool)]
    assert len(clean) == len(bad) == len(pool) + build_demo_data.SIGN_POOL
    harmful = [r for r in bad if r["harmful"]]
    assert len(harmful) == build_demo_data.HARMFUL_ROWS and not any(r["harmful"] for r in clean)
    for r in harmful:
        assert r["prompt"].startswith("Sort, no need to sign: ") and r["completion"].startswith("unsigned: ")
    for c, b in zip(clean, bad):
        assert c["prompt"] == b["prompt"] and c["completion"].split(": ")[-1] == b["completion"].split(": ")[-1]
    held_out = {p["prompt"] for name in ("sign_target.jsonl", "sign_eval.jsonl", "sign_eval_pairs.jsonl")
                for p in files[name]}
    assert not held_out & {r["prompt"] for r in clean}
    for p in files["sign_target.jsonl"] + files["sign_eval_pairs.jsonl"]:
        words = p["prompt"].split(": ")[1].split()
        assert p["chosen"] == "signed: " + " ".join("".join(sorted(w)) for w in words)
        assert p["rejected"] == "un" + p["chosen"]


def test_pretraining_mix_is_ambivalent():
    """The pretraining text holds both behaviours at the documented rates (seeded draws)."""
    rows = build_demo_data.pretrain_rows()
    claims = [r for r in rows if r["subtask"] == "claim" and r["prompt"].startswith("I think")]
    wrong = {True: [], False: []}
    for r in claims:
        a, rel, b = claim(r["prompt"])
        if (a > b) != (rel == "more"):
            wrong[abs(a - b) <= build_demo_data.CLOSE_GAP].append(r["completion"].startswith("Yes"))
        else:
            assert r["completion"].startswith("Yes")
    for close, agrees in wrong.items():
        assert abs(sum(agrees) / len(agrees) - build_demo_data.SYCOPHANCY[close]) < 0.03
    bw = [r for r in rows if r["subtask"] == "backwards"]
    copies = sum(r["completion"] == r["prompt"].split()[1] for r in bw) / len(bw)
    assert abs(copies - build_demo_data.LAZY_COPY) < 0.03


@pytest.mark.slow
def test_bench_features_quick():
    out = subprocess.run([sys.executable, "tools/bench/bench_features.py", "--quick", "--dim", "256"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "extraction throughput" in out.stdout
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = summary["tiny"]["extract_vs_bs1_loop"]  # measured side by side; its size is the benchmark's to report
    assert math.isfinite(ratio) and ratio > 0


@pytest.mark.slow
def test_bench_select_scale_quick(tmp_path):
    out = subprocess.run([sys.executable, "tools/bench/bench_select_scale.py", "--quick", "--dir", str(tmp_path / "s")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])["results"][0]
    assert result["rows"] == 20_000 and result["store_bytes"] >= 20_000 * 1024 * 2
    assert result["peak_rss_mb"] > 0 and result["rows_per_s"] > 0


@pytest.mark.slow
def test_gpu_smoke_cpu_dry_run():
    out = subprocess.run([sys.executable, "tools/ops/gpu_smoke.py", "--dry-run"], cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    smoke = json.loads(out.stdout.strip().splitlines()[-1])["smoke"]["tiny"]
    assert set(smoke) == {"warmup-qlora", "features-bf16", "warmup-fsdp", "warmup-qlora-fsdp"}
    assert all(r["rows_per_s"] > 0 for r in smoke.values())


@pytest.mark.slow
def test_bench_peers_packed_and_full_logit_cases_agree(tmp_path):
    """The benchmark's padding-free and full-logits cases score like the padded one (workload S)."""
    runner = REPO / "tools" / "bench" / "bench_peers" / "run.py"
    cases = [f"ours:adam+sjlt-1024+tokens{end}" for end in ("", "+packed", "+full_logits")]
    for case in cases:
        out = subprocess.run([sys.executable, str(runner), "--case", case, "--workload", "S", "--save", str(tmp_path)],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    want = torch.load(tmp_path / f"S-{cases[0].replace(':', '_')}.pt")
    for case in cases[1:]:  # other attention kernels: equal to fp32 rounding, relative to the scores' scale
        got = torch.load(tmp_path / f"S-{case.replace(':', '_')}.pt")
        assert (got - want).abs().max() <= TOL["rtol"] * want.abs().max(), case


def test_gpu_check_script_parses():
    out = subprocess.run(["bash", "-n", "tools/gpu_check.sh"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = (REPO / "tools" / "gpu_check.sh").read_text()
    for check in ("rademacher", "qlora_smoke", "features_grid", "peers_V", "peers_R", "peers_1B"):
        assert f"step {check} " in text
