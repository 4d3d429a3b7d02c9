"""Data formats: every accepted shape parses; every bad input fails early with file, row and field."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from conftest import write_jsonl

from prism_lightning import TINY_MODEL
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
    with pytest.warns(UserWarning, match=r"2 rows longer than max_length=8 had their prompt cut from the left to fit "
                                         r"\(answers are kept whole\)"):
        a = enc.encode(long_prompt, "dcba", "f: row 1")
        enc.encode(long_prompt, "dcba", "f: row 2")
        enc.warn_truncated("f")
    assert len(a.input_ids) == 8
    assert a.input_ids[a.prompt_len:] == tok("dcba", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with pytest.raises(DataFormatError, match=r"f: row 3: \d+ tokens exceed max_length=8"):
        Encoder(tok, max_length=8, truncation="error").encode(long_prompt, "dcba", "f: row 3")
    with pytest.raises(DataFormatError, match=r"f: row 4: the answer alone is \d+ tokens, more than max_length=8"):
        enc.encode("q", "a much longer answer than eight tokens", "f: row 4")  # never cut: refused


def test_chat_template_renders_messages(tok):
    enc = Encoder(tok, max_length=64).encode([{"role": "user", "content": "Reverse abc"}], "cba", "w")
    text = tok.decode(enc.input_ids)
    assert text.startswith("Reverse abc\n") and "cba" in text


def test_datamodule_errors_before_compute(tmp_path, small_data):
    from prism_lightning.data import PrismDataModule

    bad = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "x"}])
    dm = PrismDataModule(tokenizer=TINY_MODEL,
                         pool=str(small_data["pool"]), target=str(bad), eval_sft=None, eval_pairs=None)
    with pytest.raises(DataFormatError, match="pairs.jsonl: row 1"):
        dm.setup("fit")


def test_warmup_subset_is_seeded_fraction(small_data):
    from prism_lightning.data import PrismDataModule

    dm = PrismDataModule(tokenizer=TINY_MODEL,
                         pool=str(small_data["pool"]), target=None, eval_sft=None, eval_pairs=None,
                         warmup_fraction=0.25, seed=3)
    dm.setup("fit")
    idx = dm.warmup_indices()
    assert len(idx) == 12 and idx == sorted(idx) and len(set(idx)) == 12
    again = PrismDataModule(tokenizer=TINY_MODEL,
                            pool=str(small_data["pool"]), target=None, eval_sft=None, eval_pairs=None,
                            warmup_fraction=0.25, seed=3)
    again.setup("fit")
    assert again.warmup_indices() == idx
    other = PrismDataModule(tokenizer=TINY_MODEL,
                            pool=str(small_data["pool"]), target=None, eval_sft=None, eval_pairs=None,
                            warmup_fraction=0.25, seed=4)
    other.setup("fit")
    assert other.warmup_indices() != idx


LLAMA3_STYLE = ("{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")


@pytest.fixture()
def chat_tokenizer(tmp_path):
    """The tiny tokenizer with a Llama-3-style template (it writes BOS) and BOS added to plain text."""
    from tokenizers.processors import TemplateProcessing

    from prism_lightning.config import ModelArgs
    from prism_lightning.modeling import load_tokenizer

    tok = load_tokenizer(ModelArgs())
    tok.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|end|>"]})
    tok.chat_template = LLAMA3_STYLE
    bos = [("<s>", tok.bos_token_id)]
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=bos)
    return tok


def test_chat_rows_render_like_trl_with_one_bos(chat_tokenizer):
    """Training: template(prompt + answer), loss on what follows template(prompt, generation prompt); evaluation
    tokenizes the prompt the same way. One BOS each, where a text-then-template pipeline would put two."""
    from prism_lightning.data.tokenize import prompt_ids

    tok = chat_tokenizer
    prompt = [{"role": "user", "content": "Is 47 more than 52?"}]
    enc = Encoder(tok, 256).encode(prompt, "No.", "row 1")
    full = tok.apply_chat_template([*prompt, {"role": "assistant", "content": "No."}], tokenize=True, return_dict=False)
    assert enc.input_ids == list(full) and enc.input_ids.count(tok.bos_token_id) == 1
    answer = tok.decode(enc.input_ids[enc.prompt_len:])
    assert answer == "No.<|end|>"  # the answer and the template's end of turn carry the loss; the prompt does not
    assert tok.decode(enc.input_ids[: enc.prompt_len]).endswith("<|start|>assistant\n")
    ids = prompt_ids(tok, prompt)
    assert ids == enc.input_ids[: enc.prompt_len] and ids.count(tok.bos_token_id) == 1
    text = tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))["input_ids"]
    assert text.count(tok.bos_token_id) == 2  # what rendering to text and tokenizing again would give


def test_evaluation_generates_from_the_training_prompt_ids(chat_tokenizer, monkeypatch):
    from prism_lightning.eval.generation import greedy_generate

    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, **kw):
            seen.append((input_ids, attention_mask))
            return torch.cat([input_ids, torch.full((len(input_ids), 1), chat_tokenizer.eos_token_id)], dim=1)

    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "A longer question here"}]]
    greedy_generate(Recorder(), chat_tokenizer, prompts)
    ids, mask = seen[0]
    from prism_lightning.data.tokenize import prompt_ids

    for row, m, p in zip(ids.tolist(), mask.tolist(), prompts):
        real = [t for t, k in zip(row, m) if k]
        assert real == prompt_ids(chat_tokenizer, p) and real.count(chat_tokenizer.bos_token_id) == 1
        assert m == sorted(m)  # left padding


def test_load_dataset_specs(tmp_path):
    """Data files through a builder, a folder of split files, and a saved DatasetDict: a split is required."""
    from prism_lightning.config import DatasetSpec

    rows = [{"id": f"r{i}", "prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:1])
    got = load_sft(DatasetSpec(path="json", data_files=str(tmp_path / "train.jsonl"), split="train"))
    assert [r.id for r in got] == ["r0", "r1", "r2"]
    with pytest.raises(DataFormatError, match=r"has splits \['test', 'train'\]; choose one with split"):
        load_sft(DatasetSpec(path=str(tmp_path)))
    assert len(load_sft({"path": str(tmp_path), "split": "test"})) == 1
    datasets.DatasetDict({"a": datasets.Dataset.from_list(rows), "b": datasets.Dataset.from_list(rows[:2])}) \
        .save_to_disk(str(tmp_path / "saved"))
    assert len(load_sft(DatasetSpec(path=str(tmp_path / "saved"), split="b"))) == 2
    with pytest.raises(DataFormatError, match=r"no split 'c'"):
        load_sft(DatasetSpec(path=str(tmp_path / "saved"), split="c"))


@pytest.mark.slow
def test_a_spec_in_a_config_reaches_the_data_module(tmp_path):
    from prism_lightning.cli import main
    from prism_lightning.config import DatasetSpec

    write_jsonl(tmp_path / "pool.jsonl", [{"prompt": "q", "completion": "a"}])
    spec = json.dumps({"path": "json", "data_files": str(tmp_path / "pool.jsonl"), "split": "train"})
    cli = main(["--config", "configs/tiny/warmup.yaml", "--data.pool", spec, "--model.init_args.output_dir",
                str(tmp_path)], run=False)
    pool = cli.datamodule.pool
    pool = pool if isinstance(pool, DatasetSpec) else DatasetSpec(**pool)
    assert pool == DatasetSpec("json", "train", data_files=str(tmp_path / "pool.jsonl"))
    cli.datamodule.load()
    assert [r.completion for r in cli.datamodule.pool_rows] == ["a"]


def test_tokenization_is_cached_and_keyed_by_its_settings(small_data, tmp_path, monkeypatch):
    """A second data module with the same rows and settings loads the cached ids without tokenizing; another
    max_length is another cache entry."""
    import prism_lightning.data.encoding as encoding
    from prism_lightning.data import PrismDataModule

    def make(max_length):
        return PrismDataModule(tokenizer=TINY_MODEL,
                               pool=str(small_data["pool"]), target=str(small_data["target_pairs"]), eval_sft=None,
                               eval_pairs=None, max_length=max_length, cache_dir=str(tmp_path))

    first = make(64)
    first.load()
    assert len(list((tmp_path / "tokenized").glob("*/*.arrow"))) == 3  # pool, chosen, rejected

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(encoding, "_encode_batch", refuse)
    again = make(64)
    again.load()
    assert [again.pool_encoded[i] for i in range(3)] == [first.pool_encoded[i] for i in range(3)]
    assert again.fingerprint("pool") == first.fingerprint("pool")
    with pytest.raises(AssertionError, match="tokenized again"):
        make(48).load()


# A ChatML-style template whose assistant content is marked as `{% generation %}` (what transformers' assistant
# mask, and so TRL SFT's `assistant_only_loss`, needs).
CHATML_GENERATION = (
    "{% for m in messages %}{{ '<|start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_every_assistant_turn_is_learned_as_trl_masks_it(turns):
    """``chat_loss: all_assistant_turns``: the labelled tokens are exactly transformers' assistant mask (TRL's
    ``assistant_only_loss``) on the same conversation; ``last_turn`` keeps only the last."""
    from prism_lightning.config import ModelArgs
    from prism_lightning.data.tokenize import Encoder, pad_batch
    from prism_lightning.modeling import load_tokenizer

    tok = load_tokenizer(ModelArgs())
    tok.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|end|>"]})
    tok.chat_template = CHATML_GENERATION
    chat = [{"role": "system", "content": "Be brief."}]
    for t in range(turns):
        chat += [{"role": "user", "content": f"Reverse ab{t}"}, {"role": "assistant", "content": f"{t}ba"}]
    reference = tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    encoded = Encoder(tok, max_length=512, all_turns=True).encode(chat[:-1], chat[-1]["content"], "w")
    assert encoded.input_ids == reference["input_ids"]
    labels = pad_batch([encoded], tok.pad_token_id)["labels"][0]
    assert (labels != -100).long().tolist() == reference["assistant_masks"]
    last = Encoder(tok, max_length=512).encode(chat[:-1], chat[-1]["content"], "w")  # chat_loss: last_turn
    learned = (pad_batch([last], tok.pad_token_id)["labels"][0] != -100).nonzero().flatten().tolist()
    assert learned == list(range(last.prompt_len, len(last.input_ids)))  # what follows the prompt, as TRL's
    assert last.input_ids == encoded.input_ids  # completion-only loss on a prompt-completion row learns
