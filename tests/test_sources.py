"""Data settings parse as the user wrote them: every format as a relative path from the CLI and from YAML, a
``load_dataset`` mapping, per-source column names; the stages run on a CSV pool given by a relative path."""

from __future__ import annotations

import csv
import json

import datasets
import pytest
from conftest import REPO

from prism_lightning.cli import main

CONFIG = str(REPO / "configs" / "tiny" / "warmup.yaml")


def rows(small_data) -> list[dict]:
    return [json.loads(x) for x in small_data["pool"].read_text().splitlines()]


def write_formats(folder, records: list[dict]) -> dict[str, str]:
    """The same rows as CSV, TSV, JSONL, JSON, Parquet, a folder of JSONL files and a load_dataset mapping."""
    plain = [{k: ("" if v is None else str(v) if k == "harmful" else v) for k, v in r.items()} for r in records]
    fields = list(plain[0])
    for name, delimiter in (("pool.csv", ","), ("pool.tsv", "\t")):
        with open(folder / name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, delimiter=delimiter)
            writer.writeheader()
            writer.writerows(plain)
    (folder / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "pool.json").write_text(json.dumps(records))
    datasets.Dataset.from_list(plain).to_parquet(str(folder / "pool.parquet"))
    (folder / "parts").mkdir()
    half = len(records) // 2
    for i, part in enumerate((records[:half], records[half:])):
        (folder / "parts" / f"part-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return {"csv": "pool.csv", "tsv": "pool.tsv", "jsonl": "pool.jsonl", "json": "pool.json",
            "parquet": "pool.parquet", "folder": "parts",
            "spec": json.dumps({"path": "json", "data_files": "pool.jsonl", "split": "train"})}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "json", "parquet", "folder", "spec"])
def test_every_format_by_relative_path_from_the_cli_and_from_yaml(kind, small_data, tmp_path, monkeypatch):
    records = rows(small_data)
    monkeypatch.chdir(tmp_path)
    value = write_formats(tmp_path, records)[kind]
    (tmp_path / "data.yaml").write_text(f"data:\n  pool: {value if kind != 'spec' else json.loads(value)}\n")
    for args in (["--data.pool", value], ["--config", "data.yaml"]):
        cli = main(["--config", CONFIG, *args, "--model.init_args.output_dir", "out"], run=False)
        pool = cli.datamodule.pool
        assert pool == (json.loads(value) if kind == "spec" else value), pool  # the setting as written
        cli.datamodule.load()
        got = [(r.id, r.prompt, r.completion, r.subtask) for r in cli.datamodule.pool_rows]
        assert got == [(r["id"], r["prompt"], r["completion"], r["subtask"]) for r in records]


def test_a_spec_with_unknown_keys_is_refused():
    from prism_lightning.config import DataArgs
    from prism_lightning.errors import SettingsError

    with pytest.raises(SettingsError, match=r"pool: unknown keys \['file'\] in a load_dataset spec"):
        DataArgs(pool={"path": "json", "file": "x.jsonl"})
    with pytest.raises(SettingsError, match="target: a load_dataset spec needs 'path'"):
        DataArgs(target={"split": "train"})


def test_per_source_column_names(tmp_path):
    from prism_lightning import TINY_MODEL
    from prism_lightning.data import PrismDataModule

    (tmp_path / "pool.jsonl").write_text(json.dumps({"uid": "a", "instruction": "q", "output": "x"}) + "\n")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"uid": "p", "question": "q", "good": "x", "bad": "y"}) + "\n")
    dm = PrismDataModule(tokenizer=TINY_MODEL, pool=str(tmp_path / "pool.jsonl"), target=str(tmp_path / "pairs.jsonl"),
                         eval_sft=None, eval_pairs=None, columns={"id": "uid"},
                         pool_columns={"id": "uid", "prompt": "instruction", "completion": "output"},
                         target_columns={"id": "uid", "prompt": "question", "chosen": "good", "rejected": "bad"})
    dm.load()
    assert (dm.pool_rows[0].prompt, dm.target_rows[0].chosen, dm.target_rows[0].id) == ("q", "x", "p")


@pytest.mark.slow
def test_the_stages_run_on_a_csv_pool_given_by_a_relative_path(small_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_formats(tmp_path, rows(small_data))
    (tmp_path / "pairs.jsonl").write_text(small_data["target_pairs"].read_text())
    data = ["--data.pool", "pool.csv", "--data.target", "pairs.jsonl", "--data.eval_sft", "null",
            "--data.eval_pairs", "null", "--data.warmup_fraction", "0.5", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false"]
    main(["fit", "--config", CONFIG, *data, "--trainer.max_epochs", "1", "--model.init_args.output_dir", "run"])
    main(["predict", "--config", str(REPO / "configs" / "tiny" / "features.yaml"), *data,
          "--model.init_args.output_dir", "run", "--model.init_args.checkpoint_dir", "run/warmup"])
    main(["select", "--features", "run/features", "--selection.fraction", "0.25"])
    scores = (tmp_path / "run" / "selection" / "prism" / "scores.jsonl").read_text().splitlines()
    assert len(scores) == len(rows(small_data))
    manifest = json.loads((tmp_path / "run" / "features" / "epoch-1" / "pool" / "manifest.json").read_text())
    assert manifest["source"] == str(tmp_path / "pool.csv")  # recorded absolute, so select finds it from anywhere
