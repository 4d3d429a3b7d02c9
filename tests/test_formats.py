"""Data formats: every accepted shape parses; every bad input fails early with file, row and field."""

from __future__ import annotations

import json

import datasets
import pytest
from conftest import write_jsonl

from prism_lightning.config import ModelArgs
from prism_lightning.data.formats import load_pairs, load_sft
from prism_lightning.data.tokenize import Encoder, pad_batch
from prism_lightning.errors import DataFormatError
from prism_lightning.influence.objective import IGNORE
from prism_lightning.modeling import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelArgs())


def test_sft_shapes_parse(tmp_path):
    rows = [{"id": "a", "prompt": "What is 1+2?\n", "completion": "3", "subtask": "add", "harmful": False},
            {"id": "b", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"text": "free text"}]
    out = load_sft(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [r.id for r in out] == ["a", "b", "2"]
    assert out[0].extra == {"harmful": False} and out[0].subtask == "add"
    assert out[1].prompt == [{"role": "user", "content": "hi"}] and out[1].completion == "yo"
    assert out[2].prompt == "" and out[2].completion == "free text"


def test_pairs_strings_and_messages(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"},
            {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no"}]}]
    out = load_pairs(write_jsonl(tmp_path / "t.jsonl", rows))
    assert (out[0].chosen, out[0].rejected) == ("a", "b")
    assert out[1].prompt == [{"role": "user", "content": "q"}] and out[1].chosen == "yes"


def test_parquet_csv_and_saved_dataset(tmp_path):
    rows = [{"id": "x", "prompt": "p", "completion": "c"}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in ("d.parquet", "d.csv", "saved"):
        assert load_sft(tmp_path / path)[0].completion == "c"


def test_column_mapping(tmp_path):
    from prism_lightning.config import Columns

    path = write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "answer": "a"}])
    assert load_sft(path, Columns(prompt="question", completion="answer"))[0].completion == "a"


@pytest.mark.parametrize("rows, pattern", [
    ([{"id": "a", "prompt": "p"}], r"row 1: field 'completion' is missing"),
    ([{"id": "a", "prompt": "p", "completion": "  "}], r"row 1: field 'completion' is empty"),
    ([{"id": "a", "prompt": "p", "completion": "c"}, {"id": "a", "prompt": "q", "completion": "d"}],
     r"row 2: duplicate id 'a'"),
    ([{"id": "a", "question": "p"}], r"row 1: no 'prompt'/'completion'"),
    ([{"id": "a", "messages": [{"role": "user", "content": "hi"}]}], r"must end with an assistant message"),
])
def test_bad_sft_rows(tmp_path, rows, pattern):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataFormatError, match=pattern) as err:
        load_sft(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("rows, pattern", [
    ([{"prompt": "q", "chosen": "same", "rejected": "same"}], r"row 1: 'chosen' equals 'rejected'"),
    ([{"prompt": "q", "chosen": "a"}], r"row 1: field 'rejected' is missing"),
    ([{"prompt": "q", "chosen": "a", "rejected": ""}], r"row 1: field 'rejected' is empty"),
])
def test_bad_pairs(tmp_path, rows, pattern):
    with pytest.raises(DataFormatError, match=pattern):
        load_pairs(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_empty_file_and_missing_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataFormatError, match="empty"):
        load_sft(tmp_path / "e.jsonl")
    with pytest.raises(DataFormatError, match="no such file"):
        load_sft(tmp_path / "nope.jsonl")


def test_non_utf8_and_broken_json(tmp_path):
    good = json.dumps({"prompt": "p", "completion": "c"}).encode() + b"\n"
    (tmp_path / "latin.jsonl").write_bytes(good + b'{"prompt": "caf\xe9", "completion": "c"}\n')
    with pytest.raises(DataFormatError, match=r"line 2: not valid UTF-8"):
        load_sft(tmp_path / "latin.jsonl")
    (tmp_path / "broken.jsonl").write_bytes(good + b"{not json\n")
    with pytest.raises(DataFormatError, match=r"line 2: invalid JSON"):
        load_sft(tmp_path / "broken.jsonl")


def test_label_masking_covers_response_and_eos_only(tok):
    enc = Encoder(tok, max_length=64).encode("What is 1+2?\n", "3", "t: row 1")
    batch = pad_batch([enc, Encoder(tok, 64).encode("Reverse abc\n", "cba", "t: row 2")], tok.pad_token_id)
    labels = batch["labels"][0]
    resp = labels[labels != IGNORE].tolist()
    assert resp == tok("3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert (labels[: enc.prompt_len] == IGNORE).all()
    assert batch["attention_mask"][0].sum() == len(enc.input_ids)
    assert (batch["labels"][0][len(enc.input_ids):] == IGNORE).all()  # padding carries no loss


def test_truncation_left_warns_once_and_error_refuses(tok):
    enc = Encoder(tok, max_length=8)
    long_prompt = "Reverse " + "abcd " * 10
    with pytest.warns(UserWarning, match="2 rows longer than max_length=8"):
        a = enc.encode(long_prompt, "dcba", "f: row 1")
        enc.encode(long_prompt, "dcba", "f: row 2")
        enc.warn_truncated("f")
    assert len(a.input_ids) == 8
    assert a.input_ids[a.prompt_len:] == tok("dcba", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with pytest.raises(DataFormatError, match=r"f: row 3: \d+ tokens exceed max_length=8"):
        Encoder(tok, max_length=8, truncation="error").encode(long_prompt, "dcba", "f: row 3")


def test_chat_template_renders_messages(tok):
    enc = Encoder(tok, max_length=64).encode([{"role": "user", "content": "Reverse abc"}], "cba", "w")
    text = tok.decode(enc.input_ids)
    assert text.startswith("Reverse abc\n") and "cba" in text


def test_datamodule_errors_before_compute(tmp_path, small_data):
    from prism_lightning.data import PrismDataModule

    bad = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "x"}])
    dm = PrismDataModule(pool=str(small_data["pool"]), target=str(bad), eval_sft=None, eval_pairs=None)
    with pytest.raises(DataFormatError, match="pairs.jsonl: row 1"):
        dm.setup("fit")


def test_warmup_subset_is_seeded_fraction(small_data):
    from prism_lightning.data import PrismDataModule

    dm = PrismDataModule(pool=str(small_data["pool"]), target=None, eval_sft=None, eval_pairs=None,
                         warmup_fraction=0.25, seed=3)
    dm.setup("fit")
    idx = dm.warmup_indices()
    assert len(idx) == 12 and idx == sorted(idx) and len(set(idx)) == 12
    again = PrismDataModule(pool=str(small_data["pool"]), target=None, eval_sft=None, eval_pairs=None,
                            warmup_fraction=0.25, seed=3)
    again.setup("fit")
    assert again.warmup_indices() == idx
    other = PrismDataModule(pool=str(small_data["pool"]), target=None, eval_sft=None, eval_pairs=None,
                            warmup_fraction=0.25, seed=4)
    other.setup("fit")
    assert other.warmup_indices() != idx
