"""Nothing silently wrong on the newer surfaces: curvature files, warmup runs, base models, labels and ids,
truncation, chat rows, mode lists, signals, report escaping, and failures named in one line.

Each case asserts its outcome: refused before compute naming the file, row or field and the fix, or
handled correctly. Real file systems where it matters: a read-only mount and a full tmpfs (skipped, saying
why, where mounting is not allowed), two real processes for the lock, real signals.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import pytest
from conftest import REPO, warmup_run, write_jsonl
from test_features import extract

from prism_lightning import TINY_MODEL
from prism_lightning.cli import main
from prism_lightning.config import ModelArgs, PipelineArgs, ProjectionArgs, SelectArgs, SelectionArgs
from prism_lightning.data import PrismDataModule
from prism_lightning.data.formats import PoolIndex, load_pairs, load_sft
from prism_lightning.errors import (
    DataFormatError,
    SettingsError,
    StageMismatchError,
    StoreCorruptError,
    StoreMismatchError,
)
from prism_lightning.modules import CurvatureModule, GradientFeatureModule
from prism_lightning.modules.curvature import fit_curvature
from prism_lightning.modules.features import find_checkpoints
from prism_lightning.select import run_selection

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), OMP_NUM_THREADS="1")
ENV.pop("PRISM_DEBUG", None)


def one_line(capsys, run, code: int = 2) -> str:
    """The CLI's stderr when ``run()`` exits with ``code``: one ``error:`` line naming the problem, no traceback."""
    with pytest.raises(SystemExit) as stop:
        run()
    err = capsys.readouterr().err.strip()
    assert stop.value.code == code, err[-2000:]
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: "), err[-2000:]
    return err.splitlines()[-1]


def trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", inference_mode=False, logger=False, enable_progress_bar=False,
                     enable_model_summary=False)


def data(small_data, **kw) -> PrismDataModule:
    return PrismDataModule(tokenizer=TINY_MODEL, pool=str(small_data["pool"]), target=str(small_data["target_pairs"]),
                           eval_sft=None, eval_pairs=None, max_length=64, warmup_fraction=0.5, **kw)


# ----- curvature factors are checked by content ------------------------------------------------------------
@pytest.fixture(scope="module")
def factors(warmed, small_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("factors")
    shutil.copytree(warmed / "warmup", run / "warmup")
    fit_curvature(trainer(), CurvatureModule(checkpoint_dir=str(run / "warmup")), data(small_data))
    return run


def ekfac_features(run: Path, small_data, out: Path) -> None:
    module = GradientFeatureModule(checkpoint_dir=str(run / "warmup"), output_dir=str(out), splits=["pool"],
                                   projection=ProjectionArgs(kind="sjlt", dim=64), pool_preconditioner="ekfac")
    trainer().predict(module, datamodule=data(small_data), return_predictions=False)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flipped", "epoch-1 copied over epoch-2", "truncated"])
def test_curvature_factors_are_checked_by_content(factors, small_data, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(factors, run)
    target = run / "warmup" / "epoch-2" / "curvature.safetensors"
    if damage == "flipped":
        raw = bytearray(target.read_bytes())
        for i in range(len(raw) - 200, len(raw) - 136):
            raw[i] ^= 0x5A
        target.write_bytes(bytes(raw))
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:-1000])
    else:
        shutil.copyfile(run / "warmup" / "epoch-1" / "curvature.safetensors", target)
    with pytest.raises(StoreCorruptError, match=r"epoch-2/curvature.safetensors: its sha256 differs from .*"
                                                r"curvature.json .*prism_lightning curvature"):
        ekfac_features(run, small_data, tmp_path / "out")
    assert not (tmp_path / "out" / "features").exists()  # refused before any store was started


# ----- a warmup folder belongs to one run ------------------------------------------------------------------
@pytest.mark.slow
def test_a_warmup_folder_belongs_to_one_run(small_data, tmp_path):
    warmup_run(tmp_path / "a", small_data, epochs=2)
    run = json.loads((tmp_path / "a" / "warmup" / "run.json").read_text())
    infos = [json.loads((tmp_path / "a" / "warmup" / f"epoch-{e}" / "checkpoint.json").read_text()) for e in (1, 2)]
    assert {i["run_id"] for i in infos} == {run["run_id"]} and run["base_model"]["sha256"]
    with pytest.raises(StageMismatchError, match=r"holds the checkpoints of another warmup .*epoch-1, epoch-2.*"
                                                 r"force: true to replace them"):
        warmup_run(tmp_path / "a", small_data, epochs=1)
    warmup_run(tmp_path / "a", small_data, epochs=1, force=True)  # the old run is replaced, not mixed in
    assert sorted(p.name for p in (tmp_path / "a" / "warmup").glob("epoch-*")) == ["epoch-1"]
    assert json.loads((tmp_path / "a" / "warmup" / "run.json").read_text())["run_id"] != run["run_id"]
    # checkpoints of two runs in one folder (copied by hand) are refused by the feature stage
    warmup_run(tmp_path / "b", small_data, epochs=2)
    shutil.copytree(tmp_path / "b" / "warmup" / "epoch-2", tmp_path / "a" / "warmup" / "epoch-2")
    with pytest.raises(StoreMismatchError, match=r"come from different warmup runs \(epoch-1: \w+, epoch-2: \w+"):
        find_checkpoints(tmp_path / "a" / "warmup")


@pytest.mark.slow
def test_import_warmup_is_all_or_nothing_and_refuses_a_used_folder(hf_run, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("PRISM_DEBUG", raising=False)
    source = tmp_path / "hf"
    shutil.copytree(hf_run / "hf", source)
    last = sorted(source.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]

    def run(*extra):
        return lambda: main(["import-warmup", "--source", str(source), "--dest", str(tmp_path / "w"), *extra])

    good = (last / "optimizer.pt").read_bytes()
    (last / "optimizer.pt").write_bytes(good[: len(good) // 2])
    assert "optimizer.pt cannot be read" in one_line(capsys, run())
    assert not (tmp_path / "w").exists() and not list(tmp_path.glob(".w.*"))  # epoch-1 was not left behind
    (last / "optimizer.pt").write_bytes(good)
    state = (last / "trainer_state.json").read_text()
    (last / "trainer_state.json").write_text(state[: len(state) // 2])
    assert "trainer_state.json is not valid JSON" in one_line(capsys, run())
    (last / "trainer_state.json").write_text(state)
    assert "base model '/nowhere/model'" in one_line(capsys, run("--base_model", "/nowhere/model"))
    run()()
    assert sorted(p.name for p in (tmp_path / "w").glob("epoch-*")) == ["epoch-1", "epoch-2"]
    assert "already holds warmup checkpoints" in one_line(capsys, run())
    run("--force", "true")()
    ids = {json.loads((tmp_path / "w" / f"epoch-{e}" / "checkpoint.json").read_text())["run_id"] for e in (1, 2)}
    assert len(ids) == 1 and ids == {json.loads((tmp_path / "w" / "run.json").read_text())["run_id"]}


# ----- the base model -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_another_base_model_or_quantization_is_refused(warmed, small_data, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "perturbed"
    shutil.copytree(TINY_MODEL, copy)
    weights = load_file(str(copy / "model.safetensors"))
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in weights.items()},
              str(copy / "model.safetensors"))
    module = GradientFeatureModule(model=ModelArgs(name_or_path=str(copy)), checkpoint_dir=str(warmed / "warmup"),
                                   output_dir=str(tmp_path), projection=ProjectionArgs(kind="sjlt", dim=64))
    with pytest.raises(StoreMismatchError, match=r"base_model.name_or_path: recorded '.*tiny-llama', now "
                                                 r"'.*perturbed'; base_model.sha256: .*another base model"):
        trainer().predict(module, datamodule=data(small_data), return_predictions=False)
    extract(warmed, small_data, tmp_path, projection=ProjectionArgs(kind="sjlt", dim=64))  # fp32 store
    nf4 = GradientFeatureModule(model=ModelArgs(quantization="nf4"), checkpoint_dir=str(warmed / "warmup"),
                                output_dir=str(tmp_path), projection=ProjectionArgs(kind="sjlt", dim=64),
                                normalize=False)
    with pytest.raises(StoreMismatchError, match=r"base_model.quantization: recorded None, now 'nf4'"):
        trainer().predict(nf4, datamodule=data(small_data, shard_size=16, eval_batch_size=8),
                          return_predictions=False)


# ----- labels, ids and subtasks -----------------------------------------------------------------------------
def test_labels_are_parsed_not_cast(tmp_path):
    rows = [{"id": f"r{i}", "prompt": "q", "completion": "a", "harmful": v}
            for i, v in enumerate(["false", "TRUE", "No", "yes", "0", 1, False, None])]
    index = PoolIndex.scan(write_jsonl(tmp_path / "p.jsonl", rows[:-1]), label="harmful")
    assert index.labels.tolist() == [False, True, False, True, False, True, False]
    assert PoolIndex.scan(write_jsonl(tmp_path / "q.jsonl", rows), label="harmful").labels is None  # a row lacks it
    (tmp_path / "p.csv").write_text("id,prompt,completion,harmful\nr0,q,a,false\nr1,q,a,true\nr2,q,a,maybe\n")
    with pytest.raises(DataFormatError, match=r"p.csv: row 3: field 'harmful' is 'maybe'; a label must be "
                                              r"true/false, 1/0 or yes/no"):
        PoolIndex.scan(tmp_path / "p.csv", label="harmful")


def test_csv_byte_order_mark_ids_and_subtasks(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufeffid,prompt,completion,subtask\nx1,q,a,3\nx2,q,b,\n".encode())
    rows = load_sft(tmp_path / "bom.csv")
    assert [r.id for r in rows] == ["x1", "x2"] and [r.subtask for r in rows] == ["3", "all"]
    assert not any("\ufeff" in k for r in rows for k in r.extra)
    jsonl = write_jsonl(tmp_path / "s.jsonl", [{"id": 7, "prompt": "q", "completion": "a", "subtask": 0}])
    assert (load_sft(jsonl)[0].id, load_sft(jsonl)[0].subtask) == ("7", "0")  # integers converted, never "all"
    for bad, field in (({"subtask": True}, "subtask"), ({"subtask": [1]}, "subtask"), ({"id": {"a": 1}}, "id")):
        path = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "completion": "a", **bad}])
        with pytest.raises(DataFormatError, match=rf"b.jsonl: row 1: field '{field}' must be a string or an integer"):
            load_sft(path)


# ----- truncation ------------------------------------------------------------------------------------------
def test_an_answer_longer_than_max_length_is_refused_not_cut(small_data, tmp_path):
    long = " ".join(["word"] * 40)
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"id": "a", "prompt": "q", "completion": long}])
    dm = PrismDataModule(tokenizer=TINY_MODEL, pool=str(pool), target=None, eval_sft=None, eval_pairs=None,
                         max_length=32)
    with pytest.raises(DataFormatError, match=r"pool.jsonl: row 1 \(id a\): the answer alone is \d+ tokens, more "
                                              r"than max_length=32.*raise data.max_length"):
        dm.load()
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"id": "p", "prompt": "q", "chosen": long + " yes",
                                                    "rejected": long + " no"}])
    dm = PrismDataModule(tokenizer=TINY_MODEL, pool=str(small_data["pool"]), target=str(pairs), eval_sft=None,
                         eval_pairs=None, max_length=32)
    with pytest.raises(DataFormatError, match=r"pairs.jsonl: row 1 \(id p\): the answer alone"):
        dm.load()


# ----- chat rows ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
     r"field 'messages\[1\].content' is empty"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},
     r"field 'messages\[0\].content' must be a non-empty string, got NoneType"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 42}]},
     r"field 'messages\[1\].content' must be a non-empty string, got int"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]},
     r"field 'messages\[1\].role' is 'robot'"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, r"field 'messages' holds only the answer"),
])
def test_chat_rows_are_validated_like_text_rows(tmp_path, row, message):
    with pytest.raises(DataFormatError, match=rf"c.jsonl: row 1: {message}"):
        load_sft(write_jsonl(tmp_path / "c.jsonl", [row]))


@pytest.mark.parametrize("row, message", [
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "b"}]}, r"field 'rejected' must end with an assistant message"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], "chosen": "a",
      "rejected": "b"}, r"field 'prompt' ends with an assistant message"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": 5}], "rejected": "b"},
     r"field 'chosen\[0\].content' must be a non-empty string, got int"),
])
def test_chat_pairs_are_validated(tmp_path, row, message):
    with pytest.raises(DataFormatError, match=rf"c.jsonl: row 1: {message}"):
        load_pairs(write_jsonl(tmp_path / "c.jsonl", [row]))


# ----- modes ---------------------------------------------------------------------------------------------
def test_mode_lists_are_refused_when_empty_or_repeated():
    for make in (lambda m: SelectArgs(modes=m), lambda m: PipelineArgs(modes=m)):
        with pytest.raises(SettingsError, match="modes is empty"):
            make([])
        with pytest.raises(SettingsError, match=r"modes repeat: \['prism', 'prism'\]"):
            make(["prism", "prism"])


@pytest.mark.slow
def test_an_existing_selection_is_kept_until_the_new_one_is_complete(stores_small, monkeypatch):
    root, dm = stores_small
    pool = PoolIndex.from_rows(dm.pool_rows)
    run_selection(root / "features", root / "sel", ["prism", "loss"], SelectionArgs(fraction=0.25), pool,
                  dm.target_rows)
    before = {p: p.read_bytes() for p in (root / "sel").rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("prism_lightning.select._write_explain", fail)
    with pytest.raises(OSError):
        run_selection(root / "features", root / "sel", ["prism", "loss"], SelectionArgs(fraction=0.5), pool,
                      dm.target_rows, force=True)
    after = {p: p.read_bytes() for p in (root / "sel").rglob("*") if p.is_file()}
    assert after == before  # every mode's old files, byte for byte; no temporary left


@pytest.fixture(scope="module")
def stores_small(warmed, small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-stores")
    return root, extract(warmed, small_data, root, shard_size=16, projection=ProjectionArgs(kind="sjlt", dim=64))


# ----- signals ---------------------------------------------------------------------------------------------
def _wait_for(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    """Until ``ready()``; the process must still be running then."""
    start = time.time()
    while not ready() and proc.poll() is None and time.time() - start < timeout:
        time.sleep(0.2)
    assert proc.poll() is None and ready(), "the command ended, or never got there"


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    """A CLI process whose output goes to a file (a full pipe would block it)."""
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=open(log, "w"), text=True)


def _no_temporaries(folder: Path) -> None:
    left = [p for p in folder.rglob(".*") if ".tmp-" in p.name or ".importing-" in p.name]
    assert not left, left


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_predict_within_a_batch_and_a_rerun_finishes(warmed, tmp_path, sig, code):
    store = tmp_path / "features" / "epoch-1" / "pool"
    cmd = [sys.executable, "-m", "prism_lightning", "predict", "--config", "configs/tiny/features.yaml",
           "--model.init_args.checkpoint_dir", str(warmed / "warmup"), "--model.init_args.output_dir", str(tmp_path),
           "--data.shard_size", "32", "--data.eval_batch_size", "8"]
    proc = _start(cmd, tmp_path / "log")
    _wait_for(proc, lambda: (store / "shard-00001.json").exists())
    proc.send_signal(sig)
    proc.wait(timeout=120)
    err = (tmp_path / "log").read_text()
    assert proc.returncode == code, err[-2000:]
    assert f"stopped by {signal.Signals(sig).name}" in err
    done = sorted(store.glob("shard-*.json"))
    assert 2 <= len(done) < 30 and not json.loads((store / "manifest.json").read_text())["complete"]
    _no_temporaries(tmp_path)
    assert subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True).returncode == 0  # resumes, completes
    assert json.loads((store / "manifest.json").read_text())["complete"]


def big_select(tmp_path: Path, modes: str) -> tuple[Path, list[str]]:
    """Synthetic stores of 200k pool rows (slow enough to interrupt) and the ``select`` command over them."""
    sys.path.insert(0, str(REPO / "tools" / "bench"))
    import bench_select_scale

    root = tmp_path / "big"
    bench_select_scale.write_inputs(root, 200_000, 64, 4096, "bfloat16")
    return root, [sys.executable, "-m", "prism_lightning", "select", "--features", str(root / "features"),
                  "--modes", modes, "--selection.plots", "false"]


@pytest.mark.slow
def test_sigterm_stops_curvature_and_select(warmed, tmp_path):
    shutil.copytree(warmed / "warmup", tmp_path / "warmup")
    cmd = [sys.executable, "-m", "prism_lightning", "curvature", "--config", "configs/tiny/curvature.yaml",
           "--model.init_args.checkpoint_dir", str(tmp_path / "warmup"), "--data.warmup_fraction", "1.0",
           "--data.shard_size", "64", "--data.eval_batch_size", "4"]
    proc = _start(cmd, tmp_path / "log")
    started = time.time()
    _wait_for(proc, lambda: time.time() - started > 20)  # into the first pass over the 960 rows
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, (tmp_path / "log").read_text()[-2000:]
    assert not list((tmp_path / "warmup").glob("epoch-*/curvature.*"))  # no factor file half-written
    _no_temporaries(tmp_path)
    # select on a large synthetic store: stopped while scoring, nothing half-written, the old selection kept
    root, sel = big_select(tmp_path, "[prism,less,loss,random]")
    proc = _start(sel, tmp_path / "log2")
    _wait_for(proc, lambda: any(root.glob("selection/.prism.tmp-*")))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, (tmp_path / "log2").read_text()[-2000:]
    assert not (root / "selection" / "prism").exists()
    _no_temporaries(root)


@pytest.mark.slow
def test_the_next_run_removes_what_a_killed_run_left(stores_small, tmp_path):
    root, _ = stores_small
    shutil.copytree(root / "features", tmp_path / "features")
    junk = [tmp_path / "selection" / ".prism.tmp-999999", tmp_path / "selection" / ".scores.jsonl.tmp-999998"]
    junk[0].mkdir(parents=True)
    (junk[0] / "scores.jsonl").write_text("half")
    junk[1].write_text("half")
    main(["select", "--features", str(tmp_path / "features"), "--selection.fraction", "0.25"])
    assert not any(p.exists() for p in junk) and (tmp_path / "selection" / "prism" / "scores.jsonl").exists()


# ----- report escaping -------------------------------------------------------------------------------------
PAYLOADS = ["<!-- <script>", "</script><script>alert(1)</script>", "<img src=x onerror=alert(7)>", "a & b \u2028 c"]


def synthetic_report(tmp_path: Path) -> dict:
    explained = [{"rank": i + 1, "row": i, "id": p, "subtask": "s", "score": -0.1 * i, "prompt": p, "completion": p,
                  "label": True, "pairs": [{"id": p, "subtask": "s", "contribution": 0.1, "share": 0.5, "prompt": p,
                                            "chosen": p, "rejected": p}], "other_pairs": 0.0, "by_subtask": {}}
                 for i, p in enumerate(PAYLOADS)]
    folder = tmp_path / "exp" / "seed-0" / "selection" / "prism"
    folder.mkdir(parents=True)
    (folder / "explain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in explained))
    result = {"experiment": "exp", "kind": "repair", "seed": 0, "subtask": "s", "metric": "exact_match",
              "target_noise": 0.0, "study": None, "preconditioner": "adam", "seconds": {}, "finetune": {},
              "ranking": {"modes": {"prism": {"within_subtask": {"auroc": 0.9}, "whole_pool": {"auroc": 0.9}}}},
              "explained": [{"mode": "prism", "rank": r["rank"], "id": r["id"], "subtask": "s", "label": True,
                             "score": r["score"], "prompt": r["prompt"], "completion": r["completion"],
                             "pair": r["id"], "pair_subtask": "s", "pair_share": 0.5, "pair_prompt": r["prompt"]}
                            for r in explained]}
    return {"package_version": "x", "settings": {"modes": ["prism"], "seeds": [0]},
            "model": {"name_or_path": "m"}, "lora": {"r": 1}, "results": [result]}


def test_report_escapes_what_the_data_holds(tmp_path):
    from html.parser import HTMLParser

    from prism_lightning.report import write_report

    out = write_report(tmp_path, synthetic_report(tmp_path))
    page = Path(out["report_html"]).read_text()

    class Blocks(HTMLParser):
        def __init__(self):
            super().__init__()
            self.scripts, self.tags, self._in = [], [], None

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self._in = dict(attrs).get("id") if tag == "script" else None

        def handle_data(self, data):
            if self._in == "prism-data":
                self.scripts.append(data)

    parser = Blocks()
    parser.feed(page)
    assert parser.tags.count("script") == 2 and "img" not in parser.tags  # no payload became markup
    data = json.loads("".join(parser.scripts))
    texts = json.dumps(data)
    assert all(json.dumps(p)[1:-1] in texts for p in PAYLOADS)  # every payload survives as data
    for raw in ("<!--", "</script><script>", "<img"):
        assert raw not in page.split('id="prism-data">')[1].split("</script>")[0]
    md = Path(out["report_md"]).read_text()
    assert "<img src=x" not in md and "&lt;img src=x onerror=alert(7)&gt;" in md
    from test_pipeline import chromium, headless

    if chromium() is None:
        pytest.skip("no Chromium for the rendering half (Debian: apt-get install chromium)")
    dom = headless(chromium(), "--dump-dom", Path(out["report_html"]).as_uri())
    assert 'data-rendered="yes"' in dom and dom.count("<tr data-row=") == len(PAYLOADS)  # the script ran, all rows
    assert "<img src=x" not in dom and "&lt;img src=x onerror=alert(7)&gt;" in dom  # shown as text

# ----- failures named in one line ------------------------------------------------------------------------
@pytest.mark.slow
def test_damaged_records_are_named_in_one_line(stores_small, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("PRISM_DEBUG", raising=False)
    root, _ = stores_small
    shutil.copytree(root / "features", tmp_path / "features")

    def select(*extra):
        return lambda: main(["select", "--features", str(tmp_path / "features"), "--selection.fraction", "0.25",
                             "--output_dir", str(tmp_path / "sel"), *extra])

    manifest = tmp_path / "features" / "epoch-1" / "pool" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    assert f"error: {manifest} is not valid JSON" in one_line(capsys, select())
    manifest.write_text(text)
    assert "selection.epochs [7]" in one_line(capsys, select("--selection.epochs", "[7]"))
    assert "exceeds the pool of 48 rows" in one_line(capsys, select("--selection.fraction", "null",
                                                                    "--selection.k", "100000"))
    assert "keeps none" in one_line(capsys, select("--selection.task", "repair", "--selection.fraction", "1.0"))
    assert "modes is empty" in one_line(capsys, select("--modes", "[]"))
    monkeypatch.setenv("PRISM_CACHE", str(manifest))  # a file, not a folder
    fit = ["fit", "--config", "configs/tiny/warmup.yaml", "--model.init_args.output_dir", str(tmp_path / "w")]
    assert f"PRISM_CACHE={manifest} is not a folder" in one_line(capsys, lambda: main(fit))


@contextmanager
def mounted(path: Path, options: str):
    """A tmpfs at ``path`` (skipped, saying why, where this process may not mount)."""
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if out.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip() or out.returncode}); needs root with mount "
                    "rights")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_names_the_file_being_written(warmed, tmp_path):
    with mounted(tmp_path / "small", "size=256k") as disk:
        cmd = [sys.executable, "-m", "prism_lightning", "predict", "--config", "configs/tiny/features.yaml",
               "--model.init_args.checkpoint_dir", str(warmed / "warmup"), "--model.init_args.output_dir", str(disk)]
        out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: cannot write {disk}") and "disk has space" in last, last
        _no_temporaries(disk)


@pytest.mark.slow
def test_a_read_only_folder_is_named_before_compute(tmp_path):
    with mounted(tmp_path / "ro", "ro,size=64k") as folder:
        cmd = [sys.executable, "-m", "prism_lightning", "fit", "--config", "configs/tiny/warmup.yaml",
               "--model.init_args.output_dir", str(folder)]
        start = time.time()
        out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert out.stderr.strip().splitlines()[-1] == (f"error: cannot write {folder / '.prism-lock'}: Read-only file "
                                                       "system; check that the folder is writable and the disk has "
                                                       "space")
        assert time.time() - start < 60  # before any compute


@pytest.mark.slow
def test_two_real_processes_cannot_share_an_output_folder(tmp_path):
    root, sel = big_select(tmp_path, "[prism,loss]")
    first = _start(sel, tmp_path / "log")
    try:
        _wait_for(first, lambda: (root / "selection" / ".prism-lock").exists())
        first.send_signal(signal.SIGSTOP)  # holds its lock, however fast this machine would have finished it
        try:
            second = subprocess.run(sel, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 2 and f"in use by pid {first.pid}" in second.stderr, second.stderr[-2000:]
    finally:
        assert first.wait(timeout=300) == 0
    assert (root / "selection" / "prism" / "scores.jsonl").exists()


def test_file_modes_follow_the_umask_whatever_it_is(tmp_path):
    code = ("import sys; from prism_lightning.io import atomic_write_text; from safetensors.torch import save_file; "
            "from prism_lightning.store.feature_store import write_shard; import torch; "
            "atomic_write_text(sys.argv[1] + '/a.json', '{}'); "
            "write_shard(sys.argv[1], 0, {'index': torch.arange(2), 'loss': torch.zeros(2)})")
    for umask, want in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        folder = tmp_path / f"u{umask:o}"
        folder.mkdir()
        out = subprocess.run(["bash", "-c", f"umask {umask:03o}; exec {sys.executable} -c \"{code}\" {folder}"],
                             cwd=REPO, env=ENV, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
        assert set(modes.values()) == {want}, (umask, modes)
