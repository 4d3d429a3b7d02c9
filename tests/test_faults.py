"""The fault suite: bad inputs, corruptions and operational faults, each with its exact outcome.

Every case ends in one of two ways: a clear error before any compute (naming the file, row, field or
setting, and the fix), or a correct result. Never a silent wrong one. ``CASES`` counts them for the
closing note (``pytest tests/test_faults.py -v`` lists each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_jsonl
from safetensors.torch import load_file, save_file
from test_features import extract

from prism_lightning import TINY_MODEL
from prism_lightning.cli import main
from prism_lightning.config import Experiment, PipelineArgs, ProjectionArgs, SelectionArgs
from prism_lightning.context import Stage
from prism_lightning.data import PrismDataModule
from prism_lightning.data.formats import PoolIndex, load_pairs, load_sft
from prism_lightning.errors import (
    DataFormatError,
    LockedError,
    NonFiniteError,
    SettingsError,
    StageMismatchError,
    StoreCorruptError,
    StoreMismatchError,
)
from prism_lightning.io import run_lock
from prism_lightning.select import run_selection
from prism_lightning.store.feature_store import record_path, shard_path, write_shard

SFT = {"prompt": "What is 1+1?\n", "completion": "2"}


# ----- data files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "content", "match"), [
    ("missing.jsonl", None, r"missing.jsonl: no such file"),
    ("empty.jsonl", b"", r"empty.jsonl: no rows"),
    ("blank.jsonl", b"\n  \n\n", r"blank.jsonl: no rows"),
    ("header.csv", b"id,prompt,completion\n", r"header.csv: no rows"),
    ("cut.json", b'[{"prompt": "a", "completion": "b"}, {"prompt": "c", "comp', r"cut.json: invalid JSON at line 1"),
    ("latin.jsonl", b'{"prompt": "caf\xe9", "completion": "c"}\n', r"latin.jsonl: line 1: not valid UTF-8"),
    ("broken.jsonl", b'{"prompt": "a", "completion": "b"}\n{not json\n', r"broken.jsonl: line 2: invalid JSON"),
    ("scalar.jsonl", b'"just a string"\n', r"scalar.jsonl: line 1: a JSON str, not an object"),
    ("table.xlsx", b"x", r"unsupported file type '.xlsx'"),
    ("wide.csv", b"prompt,completion\na,b,c\n", r"wide.csv: row 1 has more cells than the header"),
])
def test_unreadable_files_are_refused_with_the_file_named(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataFormatError, match=match):
        load_sft(path)


def test_csv_cells_stay_text(tmp_path):
    """Digits-only completions and an 'NA' answer are text, not numbers or missing values."""
    (tmp_path / "p.csv").write_text("id,prompt,completion\n1,What is 20+22?,42\n2,Is it there?,NA\n3,x,007\n")
    rows = load_sft(tmp_path / "p.csv")
    assert [r.completion for r in rows] == ["42", "NA", "007"] and [r.id for r in rows] == ["1", "2", "3"]


@pytest.mark.parametrize(("rows", "match"), [
    ([SFT] * 7 + [{"prompt": "p", "completion": float("nan")}], r"row 8: field 'completion' .* got NaN"),
    ([SFT, {"prompt": "p", "completion": 42}], r"row 2: field 'completion' .* got int \(42\)"),
    ([SFT, {"prompt": "p"}], r"row 2: field 'completion' is missing"),
    ([SFT, {"prompt": "p", "completion": "  "}], r"row 2: field 'completion' is empty"),
    ([{"id": "a", **SFT}, {"id": "a", **SFT}], r"row 2: duplicate id 'a' \(first at row 1\)"),
    ([{"prompt": "p", "completion": [{"role": "user", "content": "x"}]}],
     r"row 1: field 'completion' as a message list must hold exactly one assistant message"),
    ([{"question": "q", "answer": "a"}], r"row 1: no 'prompt'/'completion', 'messages' or 'text' field"),
])
def test_bad_rows_are_refused_with_row_and_field(tmp_path, rows, match):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json writes float('nan') as NaN
    with pytest.raises(DataFormatError, match=match):
        load_sft(path)


def test_conversational_completion_is_read(tmp_path):
    """TRL's conversational prompt-completion rows: the assistant message is the response."""
    rows = [{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]}]
    row = load_sft(write_jsonl(tmp_path / "c.jsonl", rows))[0]
    assert row.completion == "Hello" and row.prompt == rows[0]["prompt"]


def test_bad_pairs_are_refused(tmp_path):
    with pytest.raises(DataFormatError, match=r"row 2: 'chosen' equals 'rejected'"):
        load_pairs(write_jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                                      {"prompt": "q", "chosen": "x", "rejected": "x"}]))


def test_dataset_dict_with_several_splits_is_refused(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([SFT])
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataFormatError, match=r"DatasetDict with splits \['test', 'train'\]"):
        load_sft(tmp_path / "dd")


# ----- settings -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("make", "match"), [
    (lambda: Experiment("../esc", "repair", "p", "t", "s"), r"name must be letters, digits"),
    (lambda: Experiment("ok", "repair", "p", "t", "s", fraction=1.5), r"fraction=1.5 must be in \(0, 1\)"),
    (lambda: Experiment("ok", "forward", "p", "t", "s", clean_pool="c"), r"clean_pool is only used by repair"),
    (lambda: SelectionArgs(fraction=None), r"give exactly one of fraction and k"),
    (lambda: ProjectionArgs(dim=0), r"dim=0 must be >= 1"),
    (lambda: PipelineArgs(experiments=[Experiment("a", "repair", "p", "t", "s")] * 2, seeds=[]),
     r"experiment names repeat: \['a'\]; .*no seeds"),
    (lambda: PipelineArgs(modes=["prism", "random"], finetune_modes=["prism", "less"]),
     r"finetune_modes names \['less'\], which modes \['prism', 'random'\] does not score"),
])
def test_settings_are_refused_with_every_problem(make, match):
    with pytest.raises(SettingsError, match=match):
        make()


@pytest.mark.parametrize(("args", "line"), [
    (["select", "--config", "configs/tiny/select.yaml", "--selection.task", "foward"], 'Parser key "selection.task"'),
    (["predict", "--config", "configs/tiny/features.yaml", "--model.init_args.projection.dim", "0"],
     "error: projection: dim=0 must be >= 1"),
    (["pipeline", "--config", "configs/tiny/pipeline.yaml", "--pipeline.experiments",
      '[{"name": "../esc", "kind": "repair", "pool": "p", "target": "t", "subtask": "s"}]'],
     "error: experiment '../esc': name must be letters"),
    (["pipeline", "--config", "configs/tiny/pipeline.yaml", "--pipeline.experiments",
      '[{"name": "e", "kind": "foward", "pool": "p", "target": "t", "subtask": "s"}]'], "Got value: foward"),
])
@pytest.mark.slow
def test_bad_settings_stop_at_parse_time(args, line, capsys, monkeypatch):
    monkeypatch.delenv("PRISM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2 and line in capsys.readouterr().err


def test_pipeline_checks_every_experiment_before_compute(tmp_path, demo_data):
    """Problems of later experiments (a missing file, an empty budget, a skill with no held-out rows) are
    reported together before the first warmup runs."""
    from prism_lightning.pipeline import validate

    good = Experiment("good", "repair", str(demo_data / "pool_sycophancy.jsonl"),
                      str(demo_data / "target_sycophancy.jsonl"), "claim")
    args = PipelineArgs(experiments=[
        good, Experiment("gone", "repair", str(tmp_path / "nope.jsonl"), good.target, "claim"),
        Experiment("tiny", "forward", good.pool, good.target, "claim", fraction=0.0005),
        Experiment("noeval", "forward", good.pool, good.target, "nosuchskill")])
    with pytest.raises(SettingsError) as err:
        validate(args, tmp_path / "out", PrismDataModule())
    text = str(err.value)
    assert "nope.jsonl: no such file" in text and "fraction=0.0005 of 960 pool rows selects no row" in text
    assert "subtask 'nosuchskill' is not a subtask" in text and "data.eval_sft has none" in text
    assert not (tmp_path / "out").exists()  # nothing ran


def test_missing_local_model_path_is_named(tmp_path):
    from prism_lightning.config import ModelArgs
    from prism_lightning.modeling import load_tokenizer

    with pytest.raises(FileNotFoundError, match=r"model.name_or_path='/nonexistent/model': no such folder"):
        load_tokenizer(ModelArgs(name_or_path="/nonexistent/model"))


@pytest.mark.slow
def test_a_data_error_is_one_line_without_traceback(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != "PRISM_DEBUG"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(SFT) + "\n{oops\n")
    cmd = [sys.executable, "-m", "prism_lightning", "fit", "--config", "configs/tiny/warmup.yaml",
           "--data.pool", str(bad), "--model.init_args.output_dir", str(tmp_path / "o"),
           "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert out.returncode == 2 and lines == [f"error: {bad}: line 2: invalid JSON (Expecting property name "
                                             "enclosed in double quotes); each line must be one JSON object "
                                             "(JSON Lines)"], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    out = subprocess.run([*cmd, "--debug"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "formats.py" in out.stderr  # --debug shows where (a traceback naming the reader)


# ----- feature stores -------------------------------------------------------------------------------------
@pytest.fixture()
def store(warmed, small_data, tmp_path):
    """A fresh feature store (sjlt 64) of the small data at the shared warmup; returns (root, data module)."""
    dm = extract(warmed, small_data, tmp_path, projection=ProjectionArgs(kind="sjlt", dim=64), normalize=True)
    dm.setup("predict")
    return tmp_path, dm


def _select(root, dm, verify=True, **kw):
    return run_selection(root / "features", root / "selection", ["prism", "loss"],
                         SelectionArgs(fraction=0.25, verify=verify), PoolIndex.from_rows(dm.pool_rows), dm.target_rows,
                         **kw)


@pytest.mark.slow
def test_truncated_shard_is_refused_naming_it(store):
    root, dm = store
    path = shard_path(root / "features" / "epoch-1" / "pool", 1)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(StoreCorruptError, match=r"shard-00001.safetensors is \d+ bytes, not the \d+ its manifest "
                                                 r"records .*: delete it .* rerun the predict stage; the other shards"):
        _select(root, dm, verify=False)


@pytest.mark.slow
def test_flipped_bytes_are_caught_by_the_hash(store):
    root, dm = store
    path = shard_path(root / "features" / "epoch-2" / "pool", 0)
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 200, len(data) - 40):  # 160 bytes inside the feature values
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=r"shard-00000.safetensors is corrupt \(its sha256 differs"):
        _select(root, dm)


def _rewrite_shard(folder: Path, shard: int, edit) -> None:
    """Replace a shard by an edited copy with a matching record and manifest (a 'valid' file with bad values)."""
    path = shard_path(folder, shard)
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    from prism_lightning.io import file_sha256

    rec = json.loads(record_path(folder, shard).read_text())
    rec.update(sha256=file_sha256(path), bytes=path.stat().st_size)
    record_path(folder, shard).write_text(json.dumps(rec))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][shard] = rec
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_are_refused_when_scoring(store, value):
    root, dm = store
    folder = root / "features" / "epoch-1" / "pool"
    _rewrite_shard(folder, 0, lambda t: t["features"][3].fill_(value))
    with pytest.raises(NonFiniteError, match=r"'features' is NaN or Inf for rows \[3\]"):
        _select(root, dm)


def test_non_finite_values_are_refused_when_writing(tmp_path):
    with pytest.raises(NonFiniteError, match=r"'loss' is NaN or Inf for rows \[11\]"):
        write_shard(tmp_path, 0, {"features": torch.zeros(2, 4), "loss": torch.tensor([0.1, float("nan")]),
                                  "index": torch.tensor([10, 11])})
    assert not shard_path(tmp_path, 0).exists()


@pytest.mark.slow
def test_deleted_manifest_is_refused_not_adopted(store, warmed, small_data):
    root, dm = store
    (root / "features" / "epoch-1" / "pool" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no manifest.json but \d+ shard files"):
        _select(root, dm)
    with pytest.raises(StoreMismatchError, match=r"holds \d+ shard files but no manifest.json"):
        extract(warmed, small_data, root, projection=ProjectionArgs(kind="sjlt", dim=32), normalize=True)


@pytest.mark.slow
def test_another_pool_of_the_same_size_is_refused(store, small_data, tmp_path_factory):
    root, dm = store
    rows = [json.loads(x) for x in small_data["pool"].read_text().splitlines()]
    rows[0]["completion"] = rows[0]["completion"] + "!"  # same count, other content
    other = PrismDataModule(tokenizer=TINY_MODEL,
                            pool=str(write_jsonl(tmp_path_factory.mktemp("o") / "pool.jsonl", rows)),
                            target=str(small_data["target_pairs"]), eval_sft=None, eval_pairs=None, max_length=64)
    other.setup("predict")
    with pytest.raises(StoreMismatchError, match=r"source_sha256: recorded .*these pool rows are not the ones the "
                                                 r"features were extracted from"):
        run_selection(root / "features", root / "selection", ["prism"], SelectionArgs(fraction=0.25),
                      PoolIndex.from_rows(other.pool_rows), other.target_rows)


@pytest.mark.slow
def test_a_changed_warmup_adapter_is_refused(warmed, small_data, tmp_path):
    import shutil

    shutil.copytree(warmed / "warmup", tmp_path / "w" / "warmup")
    dm = extract(tmp_path / "w", small_data, tmp_path, projection=ProjectionArgs(kind="sjlt", dim=64))
    _select(tmp_path, dm)  # the true warmup passes
    adapter = tmp_path / "w" / "warmup" / "epoch-2" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8] + bytes(8))  # as if epoch-2 had been retrained since
    with pytest.raises(StoreMismatchError, match=r"epoch-2/pool: extracted at another warmup checkpoint than .*"
                                                 r"epoch-2/adapter_model.safetensors now holds"):
        _select(tmp_path, dm, force=True)


@pytest.mark.slow
def test_a_selection_from_another_pool_is_refused_by_the_fine_tune(store, small_data, tmp_path_factory):
    root, dm = store
    _select(root, dm)
    rows = [json.loads(x) for x in small_data["pool"].read_text().splitlines()]
    rows[5]["prompt"] = rows[5]["prompt"] + " (edited)"  # same ids, other content
    other = write_jsonl(tmp_path_factory.mktemp("o") / "pool.jsonl", rows)
    ft = PrismDataModule(tokenizer=TINY_MODEL,
                         pool=str(other), target=None, eval_sft=None, eval_pairs=None, train_on="selection",
                         selection_file=str(root / "selection" / "prism" / "selected.jsonl"), max_length=64)
    ft.load()
    with pytest.raises(DataFormatError, match=r"selected.jsonl: .*pool_sha256: recorded .*selected from another pool"):
        ft.train_indices()


@pytest.mark.slow
def test_a_rerun_with_other_settings_is_refused(store):
    root, dm = store
    _select(root, dm)
    with pytest.raises(StoreMismatchError, match=r"selection.fraction: recorded 0.25, now 0.5"):
        run_selection(root / "features", root / "selection", ["prism"], SelectionArgs(fraction=0.5),
                      PoolIndex.from_rows(dm.pool_rows), dm.target_rows)
    with Stage(root / "st", {"a": 1}, False):
        pass
    with pytest.raises(StageMismatchError, match=r"settings.a: recorded 1, now 2"):
        Stage(root / "st", {"a": 2}, False)


# ----- the output folder -----------------------------------------------------------------------------------
def test_a_second_run_into_a_folder_is_refused(tmp_path):
    """A live holder (another process) keeps the folder; once it is gone, however it ended, the lock is free."""
    code = ("import sys, time; from prism_lightning.io import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"in use by pid {holder.pid} on host .* wait for that run"), \
                run_lock(tmp_path):
            pass
    finally:
        holder.kill()  # as kill -9: nothing of the holder's runs after this
        holder.wait()
    with run_lock(tmp_path) as path:  # the kernel released the dead holder's lock
        assert json.loads(path.with_name(path.name + ".json").read_text())["pid"] == os.getpid()


@pytest.mark.slow
def test_sigterm_exits_143_and_resume_is_bit_identical(tmp_path, small_data):
    common = ["fit", "--config", "configs/tiny/warmup.yaml", "--trainer.max_epochs", "2", "--trainer.logger", "false",
              "--data.pool", str(small_data["pool"]), "--data.eval_sft", str(small_data["eval"]),
              "--data.eval_pairs", str(small_data["eval_pairs"]), "--data.warmup_fraction", "0.5",
              "--data.batch_size", "4"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))

    def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "prism_lightning", *common, "--trainer.default_root_dir", str(out),
               "--model.init_args.output_dir", str(out), *extra]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    start = time.time()
    stopped = run(tmp_path / "a", "--trainer.callbacks+=fault_helpers.SigtermAt", "--trainer.callbacks.epoch", "1",
                  "--trainer.callbacks.batch", "1")
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    warm = tmp_path / "a" / "warmup"
    assert (warm / "epoch-1").exists() and not (warm / "epoch-2").exists()
    assert (warm / "lightning" / "last.ckpt").exists()
    assert run(tmp_path / "a", "--ckpt_path", "last").returncode == 0
    assert run(tmp_path / "b").returncode == 0
    for name in ("adapter_model.safetensors", "optimizer.safetensors"):
        got = load_file(str(warm / "epoch-2" / name))
        want = load_file(str(tmp_path / "b" / "warmup" / "epoch-2" / name))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), name
    print(f"SIGTERM case: {time.time() - start:.0f}s")
