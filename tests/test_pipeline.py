"""The whole pipeline in-process on a shrunken config; outputs, report consistency, resume."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from types import SimpleNamespace

import pytest
from conftest import write_jsonl

from prism_lightning.cli import main
from prism_lightning.errors import StoreCorruptError
from prism_lightning.modules.finetune import copy_run, earlier_run, run_files, selected_rows

MODES = "[prism,prism_uniform,prism_no_anchor,less,ifguide,random,loss]"
FINETUNED = ["prism", "less", "random", "loss"]  # configs/tiny/pipeline.yaml's finetune_modes


@pytest.fixture(scope="module")
def fast_data(tmp_path_factory, demo_data):
    """10 rows per skill of the mistake-math pool (keeping its harmful add rows), small eval sets."""
    folder = tmp_path_factory.mktemp("fast-data")

    def take(name, per, keep=lambda r: True):
        rows = [json.loads(x) for x in (demo_data / name).read_text().splitlines()]
        out, count = [], {}
        for r in rows:
            if keep(r) and count.get(r["subtask"], 0) < per:
                out.append(r)
                count[r["subtask"]] = count.get(r["subtask"], 0) + 1
        return out

    pool = take("pool_mistake_math.jsonl", 6, lambda r: not r["harmful"])
    pool += take("pool_mistake_math.jsonl", 4, lambda r: r["harmful"])
    clean_ids = {r["id"] for r in pool}
    clean = [r for r in take("pool.jsonl", 100) if r["id"] in clean_ids]
    return {"pool": write_jsonl(folder / "pool.jsonl", pool), "clean": write_jsonl(folder / "clean.jsonl", clean),
            "target": write_jsonl(folder / "target.jsonl", take("target_mistake_math.jsonl", 8)),
            "eval": write_jsonl(folder / "eval.jsonl", take("eval.jsonl", 3)),
            "eval_pairs": write_jsonl(folder / "eval_pairs.jsonl", take("eval_pairs.jsonl", 3))}


def pipeline_args(data, out, modes=MODES, finetune=None):
    """The shrunken pipeline; ``finetune`` (default: every mode of ``modes``) is ``pipeline.finetune_modes``."""
    exp = {"name": "repair_fast", "kind": "repair", "pool": str(data["pool"]), "target": str(data["target"]),
           "subtask": "add", "clean_pool": str(data["clean"]), "fraction": 0.1}
    return ["pipeline", "--config", "configs/tiny/pipeline.yaml", "--output_dir", str(out),
            "--data.eval_sft", str(data["eval"]), "--data.eval_pairs", str(data["eval_pairs"]),
            "--data.warmup_fraction", "0.5", "--pipeline.experiments", json.dumps([exp]),
            "--pipeline.warmup_epochs", "2", "--pipeline.finetune_epochs", "1",
            "--pipeline.projection.dim", "512", "--pipeline.modes", modes,
            "--pipeline.finetune_modes", finetune or modes]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, fast_data):
    out = tmp_path_factory.mktemp("pipeline-a")
    main(pipeline_args(fast_data, out, finetune=f"[{','.join(FINETUNED)}]"))
    return out


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, fast_data):
    """The single-process reference with plain-gradient pool features."""
    out = tmp_path_factory.mktemp("pipeline-plain")
    main([*pipeline_args(fast_data, out, "[prism,random]"), "--pipeline.pool_preconditioner", "identity"])
    return out


@pytest.mark.slow
def test_pipeline_outputs_and_report(full_run):
    run = full_run / "repair_fast" / "seed-0"
    for stage in ("warmup", "features", "selection"):
        assert (run / stage / "stage.json").exists()
    assert sorted(p.name for p in (run / "warmup").glob("epoch-*")) == ["epoch-1", "epoch-2"]
    for epoch in (1, 2):
        for split in ("pool", "target"):
            assert json.loads((run / "features" / f"epoch-{epoch}" / split / "manifest.json").read_text())["complete"]
    for f in ("ranking_metrics.json", "roc.png", "score_distributions.png"):
        assert (run / "selection" / f).exists()
    report = json.loads((full_run / "report.json").read_text())
    assert (full_run / "report.md").read_text().startswith("# prism_lightning report")
    ranking = json.loads((run / "selection" / "ranking_metrics.json").read_text())
    result = report["results"][0]
    for mode in MODES.strip("[]").split(","):
        for f in ("scores.jsonl", "selected.jsonl", "weights.jsonl", "manifest.json"):
            assert (run / "selection" / mode / f).exists()
        auroc = report["summary"]["repair_fast"]["modes"][mode]["within_subtask.auroc"][0]
        assert auroc == ranking["modes"][mode]["within_subtask"]["auroc"] and math.isfinite(auroc)
        if mode not in FINETUNED:  # ranked only (pipeline.finetune_modes): no fine-tune, "–" in the report
            assert not (run / "finetune" / mode).exists() and mode not in result["finetune"]
            assert re.search(rf"^\| {mode} \|.*\| – \| – \| – \| – \|$", (full_run / "report.md").read_text(), re.M)
            continue
        metrics = json.loads((run / "finetune" / mode / "metrics-test.json").read_text())
        assert (run / "finetune" / mode / "adapter" / "adapter_model.safetensors").exists()
        for key in ("exact_match", "wanted", "unwanted", "pref_acc"):
            assert result["finetune"][mode][key] == metrics[f"{key}/add"]
    for extra in ("full", "oracle", "base"):
        assert math.isfinite(result["finetune"][extra]["exact_match"])
    assert not (run / "finetune" / "base" / "adapter").exists()  # base: evaluated, never trained
    md = (full_run / "report.md").read_text()
    assert md.index("## Verdicts") < md.index("## repair_fast") and "Finding the harmful rows" in md
    assert all(math.isfinite(v) and v >= 0 for v in result["seconds"].values())
    # explanations: every gradient mode, the report's table of the most harmful rows by prism
    for mode in ("prism", "less", "ifguide"):
        explained = [json.loads(x) for x in (run / "selection" / mode / "explain.jsonl").read_text().splitlines()]
        assert len(explained) == 40 and all(r["pairs"] for r in explained)
    assert not (run / "selection" / "loss" / "explain.jsonl").exists()
    table = md[md.index("most harmful rows by `prism`"):].split("\n\n")[1].splitlines()
    assert len(table) == 12 and table[2].startswith("| 40 |")  # header, rule, rank 40 (of 40) first
    assert [r["rank"] for r in result["explained"]] == list(range(40, 30, -1))


@pytest.mark.slow
def test_a_fine_tune_made_by_an_earlier_experiment_is_copied_not_redone(fast_data, tmp_path):
    """A forward experiment on the clean pool trains its ``full`` run exactly as the repair experiment's ``oracle``,
    and ``base`` is one model: both are copied (``same_as`` in ``stage.json``); the contaminated ``full`` is not."""
    args = pipeline_args(fast_data, tmp_path, "[random]")
    exps = json.loads(args[args.index("--pipeline.experiments") + 1])
    exps.append({"name": "forward_fast", "kind": "forward", "pool": str(fast_data["clean"]),
                 "target": str(fast_data["target"]), "subtask": "add", "fraction": 0.25})
    exps.append(dict(exps[0], name="repair_plain", pool_preconditioner="identity"))  # random keeps the same rows
    args[args.index("--pipeline.experiments") + 1] = json.dumps(exps)
    main(args)
    repair, forward, plain = (tmp_path / name / "seed-0" / "finetune"
                              for name in ("repair_fast", "forward_fast", "repair_plain"))
    selected = [tmp_path / name / "seed-0" / "selection" / "random" / "selected.jsonl"
                for name in ("repair_fast", "repair_plain")]
    assert selected[0].read_bytes() == selected[1].read_bytes()  # another selection, the same rows: one fine-tune
    for name in ("random", "full", "oracle", "base"):
        assert json.loads((plain / name / "stage.json").read_text())["same_as"] == f"repair_fast/seed-0/finetune/{name}"
    rows = json.loads((plain / "random" / "stage.json").read_text())["rows"]
    assert rows == json.loads((repair / "random" / "stage.json").read_text())["rows"]
    assert rows["selected_sha256"] == hashlib.sha256(selected[0].read_bytes()).hexdigest()
    for name, source in (("full", "oracle"), ("base", "base")):
        marker = json.loads((forward / name / "stage.json").read_text())
        assert marker["same_as"] == f"repair_fast/seed-0/finetune/{source}"
        got, want = (json.loads((f / "metrics-test.json").read_text()) for f in (forward / name, repair / source))
        assert got == want and "exact_match/add" in got
    weights = "adapter/adapter_model.safetensors"
    assert (forward / "full" / weights).read_bytes() == (repair / "oracle" / weights).read_bytes()
    assert "same_as" not in json.loads((forward / "random" / "stage.json").read_text())
    assert all("same_as" not in json.loads((repair / n / "stage.json").read_text()) for n in ("full", "oracle", "base"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["results"][1]["finetune"]["full"]["exact_match"] == report["results"][0]["finetune"]["oracle"][
        "exact_match"]
    files = json.loads((repair / "oracle" / "stage.json").read_text())["files"]  # the results, content-checked
    assert files[weights] == hashlib.sha256((repair / "oracle" / weights).read_bytes()).hexdigest()
    assert json.loads((forward / "full" / "stage.json").read_text())["files"] == files
    with open(forward / "full" / "metrics-test.json", "a") as fh:  # a result altered after the run finished
        fh.write(" ")
    with pytest.raises(StoreCorruptError, match=r"full: metrics-test.json is not the file"):
        main(args)


def test_modes_that_keep_the_same_rows_make_one_fine_tune(tmp_path):
    """``earlier_run`` matches a selection run to a finished run of the same settings and the same kept rows (the
    selections' ``selected.jsonl`` sha256), only among the runs before it in this invocation."""
    root = tmp_path / "exp" / "seed-0"
    ctx = SimpleNamespace(root=root, seed=0, exp=SimpleNamespace(name="exp"),
                          args=SimpleNamespace(experiments=[SimpleNamespace(name="exp")]))

    def selection(mode: str, text: str, lr: float = 3e-3) -> tuple[dict, dict | None]:
        folder = root / "selection" / mode
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "selected.jsonl").write_text(text)
        (folder / "manifest.json").write_text(json.dumps({"pool_sha256": "p", "files": {
            "selected.jsonl": hashlib.sha256(text.encode()).hexdigest()}}))
        data = {"pool": "pool.jsonl", "target": "t.jsonl", "train_on": "selection",
                "selection": {"mode": mode, "features": "f", "output_dir": str(root / "selection")}}
        return {"experiment": {"name": "exp"}, "seed": 0, "data": data, "epochs": 1, "lr": lr}, selected_rows(data)

    done, rows = selection("prism", '{"id": "a"}\n')
    (root / "finetune" / "prism").mkdir(parents=True)
    (root / "finetune" / "prism" / "stage.json").write_text(json.dumps(
        {"settings": done, "files": {"metrics-test.json": "x"}, "rows": rows}))
    same, same_rows = selection("less", '{"id": "a"}\n')
    assert same_rows == rows
    assert earlier_run(ctx, same, same_rows, ["prism"]) == (root / "finetune" / "prism", {"metrics-test.json": "x"})
    assert earlier_run(ctx, same, same_rows, []) is None  # not made before it in this invocation
    assert earlier_run(ctx, *selection("random", '{"id": "b"}\n'), ["prism"]) is None  # other rows
    assert earlier_run(ctx, *selection("loss", '{"id": "a"}\n', lr=1e-3), ["prism"]) is None  # other settings
    (root / "selection" / "less" / "selected.jsonl").write_text('{"id": "b"}\n')  # altered since its manifest
    assert selected_rows(same["data"]) is None and earlier_run(ctx, same, None, ["prism"]) is None


def test_a_copied_fine_tune_is_checked_against_the_donors_record_and_lands_whole(tmp_path):
    src = tmp_path / "src"
    (src / "adapter").mkdir(parents=True)
    (src / "adapter" / "adapter_model.safetensors").write_bytes(b"w")
    (src / "metrics-test.json").write_text("{}")
    (src / "lightning_logs").mkdir()  # a logger's files are not results
    (src / "lightning_logs" / "events").write_text("log")
    files = run_files(src)
    assert set(files) == {"adapter/adapter_model.safetensors", "metrics-test.json"}
    copy_run(src, tmp_path / "dst", files)
    assert run_files(tmp_path / "dst") == files and not (tmp_path / "dst" / "lightning_logs").exists()
    (src / "adapter" / "adapter_model.safetensors").write_bytes(b"other")
    with pytest.raises(StoreCorruptError, match="adapter/adapter_model.safetensors is not the file"):
        copy_run(src, tmp_path / "again", files)
    assert not (tmp_path / "again").exists() and not list(tmp_path.glob(".again*"))  # nothing half-copied left


@pytest.mark.slow
def test_target_checkpoint_last_extracts_the_target_side_at_the_last_checkpoint_only(fast_data, tmp_path):
    """``pipeline.target_checkpoint: last`` reaches the features stage (one target store) and the selection."""
    args = pipeline_args(fast_data, tmp_path, "[prism,less]")
    exps = json.loads(args[args.index("--pipeline.experiments") + 1])
    args[args.index("--pipeline.experiments") + 1] = json.dumps([dict(exps[0], finetune=False)])
    main([*args, "--pipeline.target_checkpoint", "last"])
    run = tmp_path / "repair_fast" / "seed-0"
    assert not (run / "features" / "epoch-1" / "target").exists()
    assert json.loads((run / "features" / "epoch-2" / "target" / "manifest.json").read_text())["epoch"] == 2
    assert (run / "features" / "epoch-1" / "pool" / "manifest.json").exists()
    for mode in ("prism", "less"):
        manifest = json.loads((run / "selection" / mode / "manifest.json").read_text())
        assert manifest["selection"]["target_checkpoint"] == "last"
        assert [s["epoch"] for s in manifest["stores"] if s["split"] == "target"] == [2, 2]
    assert json.loads((run / "features" / "stage.json").read_text())["settings"]["target_checkpoint"] == "last"


@pytest.mark.slow
def test_pipeline_with_ekfac_fits_curvature_beside_each_checkpoint(fast_data, tmp_path):
    main([*pipeline_args(fast_data, tmp_path, "[prism,random]"), "--pipeline.pool_preconditioner", "ekfac",
          "--pipeline.damping", "0.3"])
    run = tmp_path / "repair_fast" / "seed-0"
    assert json.loads((run / "curvature" / "stage.json").read_text())["seconds"] > 0
    for epoch in (1, 2):
        record = json.loads((run / "warmup" / f"epoch-{epoch}" / "curvature.json").read_text())
        assert record["rows"] == 20  # warmup_fraction 0.5 of the 40 pool rows
        manifest = json.loads((run / "features" / f"epoch-{epoch}" / "pool" / "manifest.json").read_text())
        assert manifest["preconditioner"] == "ekfac" and manifest["damping"] == 0.3
        assert manifest["curvature_sha256"] == record["sha256"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["results"][0]["preconditioner"] == "ekfac" and "curvature" in report["results"][0]["seconds"]


@pytest.mark.slow
def test_pipeline_resumes_after_interruption(full_run, fast_data, tmp_path, monkeypatch):
    import prism_lightning.select as select

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed after the feature stage")

    monkeypatch.setattr(select, "run_selection", killed)
    args = pipeline_args(fast_data, tmp_path, finetune=f"[{','.join(FINETUNED)}]")
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 130  # as after Ctrl+C
    run = tmp_path / "repair_fast" / "seed-0"
    assert (run / "features" / "stage.json").exists() and not (run / "selection" / "stage.json").exists()
    marks = {s: (run / s / "stage.json").stat().st_mtime_ns for s in ("warmup", "features")}
    monkeypatch.undo()
    main(args)
    for stage, mtime in marks.items():  # completed stages were skipped, not redone
        assert (run / stage / "stage.json").stat().st_mtime_ns == mtime
    for mode in MODES.strip("[]").split(","):  # the resumed run equals the uninterrupted one (same seed)
        a = (full_run / "repair_fast" / "seed-0" / "selection" / mode / "scores.jsonl").read_text()
        assert (run / "selection" / mode / "scores.jsonl").read_text() == a
    with pytest.raises(Exception, match="other settings"):
        main([*args, "--pipeline.warmup_epochs", "1"])


@pytest.mark.slow
@pytest.mark.distributed
def test_pipeline_under_fsdp_matches_single_process(plain_run, fast_data, tmp_path):
    """The pipeline on 2 FSDP2 processes (half the per-rank batch: same global batch) scores the pool
    as the single-process run does, and every stage (fine-tune with sharded generation too) completes."""
    import torch
    from conftest import TOL, run_cli

    # Plain-gradient pool features, as the reference run below: Adam's 1/sqrt(v') scaling amplifies the
    # float-reduction noise of a 2-process warmup (~1e-6 on the adapter and moments, compared in test_fsdp)
    # past the shared tolerance where v' is tiny.
    args = [*pipeline_args(fast_data, tmp_path, "[prism,random]"), "--pipeline.pool_preconditioner", "identity"]
    run_cli([*args, "--trainer.devices", "2", "--trainer.strategy", "fsdp2", "--data.batch_size", "8"], threads=1)
    run, ref = tmp_path / "repair_fast" / "seed-0", plain_run / "repair_fast" / "seed-0"

    def scores(root):
        rows = [json.loads(x) for x in (root / "selection" / "prism" / "scores.jsonl").read_text().splitlines()]
        return torch.tensor([r["score"] for r in rows], dtype=torch.float64)

    got, want = scores(run), scores(ref)
    scale = want.abs().max()  # scores are ~lr-sized: compare on the unit scale
    assert scale > 0 and not torch.allclose(want / scale, torch.zeros_like(want), **TOL)
    torch.testing.assert_close(got / scale, want / scale, **TOL)
    for name in ("prism", "random", "full", "oracle"):
        assert (run / "finetune" / name / "adapter" / "adapter_model.safetensors").exists()
        assert "exact_match/add" in json.loads((run / "finetune" / name / "metrics-test.json").read_text())
    assert (tmp_path / "report.md").exists()


def chromium() -> str | None:
    import shutil

    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def headless(browser: str, *args: str) -> str:
    import subprocess

    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="no Chromium (Debian: apt-get install chromium; .ci/run installs it)")
def test_report_html_renders_in_headless_chromium(full_run):
    """The page is self-contained (no address outside it), its tables render, search and sort work."""
    import re

    page = full_run / "report.html"
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)  # no network asset
    url = page.as_uri()
    dom = headless(chromium(), "--dump-dom", url)
    assert 'data-rendered="yes"' in dom
    rows = re.findall(r'<tr data-row="(\d+)"', dom)
    assert len(rows) == 40  # every explained row of prism's explain.jsonl
    filtered = headless(chromium(), "--dump-dom", url + "#q=backwards")
    kept = re.findall(r'<tr data-row="\d+">(.*?)</tr>', filtered, re.S)
    assert 0 < len(kept) < 40 and all("backwards" in k for k in kept)
    ordered = headless(chromium(), "--dump-dom", url + "#sort=score&dir=desc")
    scores = [float(x) for x in re.findall(r'<tr data-row="\d+"><td class="num">\d+</td><td>[^<]*</td><td>[^<]*</td>'
                                           r'<td[^>]*>[^<]*</td><td class="num">([-0-9.e]+)</td>', ordered)]
    assert len(scores) == 40 and scores == sorted(scores, reverse=True)
    shot = full_run / "report.png"
    headless(chromium(), f"--screenshot={shot}", "--window-size=1280,1800", url)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("PRISM_SCREENSHOT"):  # how docs/report.png (the README's picture) is made
        shutil.copyfile(shot, os.environ["PRISM_SCREENSHOT"])


@pytest.mark.slow
def test_a_run_prints_its_stages_and_nothing_else(fast_data, tmp_path):
    """The CLI in a fresh process, as a user starts it: stderr holds a start and an end line per stage (with the
    stages done, elapsed and time left), no library's tips, summaries, bars or warnings; --verbose brings them."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {k: v for k, v in os.environ.items() if k != "PRISM_DEBUG"} | {"PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "prism_lightning", *pipeline_args(fast_data, tmp_path / "quiet", "[prism,random]")]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    stages = ["warmup", "features", "select", *(f"finetune/{r}" for r in ("prism", "random", "full", "oracle",
                                                                          "base"))]
    assert len(lines) == 2 * len(stages), lines
    for i, stage in enumerate(stages):
        start, end = lines[2 * i: 2 * i + 2]
        assert start.startswith(f"repair_fast/seed-0 {stage}: ") and "done in" not in start, start
        assert re.fullmatch(rf"repair_fast/seed-0 {stage}: done in [\d.]+ s \[{i + 1}/{len(stages)} stages, "
                            r"\d:\d\d:\d\d elapsed, ~\d:\d\d:\d\d left\]", end), end
    assert out.stdout.strip().startswith("report: ")
    loud = [c if c != str(tmp_path / "quiet") else str(tmp_path / "loud") for c in cmd]
    loud = subprocess.run([*loud, "--verbose"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert loud.returncode == 0 and "GPU available" in loud.stderr  # the libraries' messages are back
