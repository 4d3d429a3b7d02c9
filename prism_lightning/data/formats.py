"""Reading and validating SFT rows and preference pairs from user files.

Accepted files: JSONL/JSON, CSV/TSV (cells as text), Parquet (read with ``datasets``), a folder of such
files (one type, name order) or one written by ``Dataset.save_to_disk``. Accepted rows:

- SFT: ``prompt`` + ``completion``; or chat ``messages`` (list of ``{role, content}``, the
  last one the assistant's answer); or ``text`` (loss on every token).
- Preference pairs (TRL convention): ``prompt``, ``chosen``, ``rejected``; ``chosen`` and
  ``rejected`` may be strings or message lists (the last assistant message is the answer).

Optional columns: ``id`` (defaults to the row number), ``subtask`` (defaults to ``"all"``)
and any ground-truth column (e.g. ``harmful``) that only evaluation reads.
Every problem is reported with file, row and field before any compute is spent.
"""

from __future__ import annotations

import csv
import hashlib
import json
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from prism_lightning.config import Columns, DatasetSpec
from prism_lightning.errors import DataFormatError

DEFAULT_COLUMNS = Columns()


@dataclass
class SFTRow:
    """One candidate example: the response is scored, the prompt is context."""

    id: str
    prompt: str | list
    completion: str | list
    subtask: str = "all"
    extra: dict = field(default_factory=dict)


@dataclass
class PairRow:
    """One target preference pair (q, y+, y-)."""

    id: str
    prompt: str | list
    chosen: str | list
    rejected: str | list
    subtask: str = "all"


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a text file, naming the line of a byte that is not UTF-8."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(f"{path}: line {lineno}: not valid UTF-8 ({err.reason} at byte "
                                      f"{err.start}); re-encode the file as UTF-8") from None


def _json_objects(path: Path) -> Iterator[dict]:
    """The objects of a JSON Lines file one at a time (blank lines skipped); a bad line is refused by number."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: line {lineno}: invalid JSON ({err.msg}); each line must be one JSON "
                                  "object (JSON Lines)") from None
        if not isinstance(row, dict):
            raise DataFormatError(f"{path}: line {lineno}: a JSON {type(row).__name__}, not an object with fields")
        yield row


def _json_lines(path: Path) -> list[dict]:
    return list(_json_objects(path))


def _json(path: Path) -> list[dict]:
    """A ``.json`` file: an array of objects, or JSON Lines."""
    text = "".join(line for _, line in _lines(path))
    if not text.lstrip().startswith("["):
        return _json_lines(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno} ({err.msg}); is the "
                              "file complete?") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataFormatError(f"{path}: item {bad + 1} of the array is a JSON {type(rows[bad]).__name__}, not an "
                              "object with fields")
    return rows


def _csv(path: Path, delimiter: str = ",") -> list[dict]:
    """Every cell as the text it holds: no type inference, no NA conversion (an empty cell is '')."""
    header, rows = None, []
    for _ in _lines(path):  # the encoding first, naming a bad line
        pass
    with open(path, newline="", encoding="utf-8-sig") as fh:  # a byte-order mark is not part of the first column
        reader = csv.DictReader(fh, delimiter=delimiter)
        header = reader.fieldnames
        try:
            rows = [dict(r) for r in reader]
        except csv.Error as err:
            raise DataFormatError(f"{path}: line {reader.line_num}: {err}") from None
    if header and any(None in r for r in rows):
        row = next(i for i, r in enumerate(rows) if None in r)
        raise DataFormatError(f"{path}: row {row + 1} has more cells than the header's {len(header)} columns")
    return rows


def _with_datasets(path: Path) -> list[dict]:
    """Parquet files and ``save_to_disk`` folders, read with ``datasets`` (errors name the path)."""
    import datasets

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if len(ds) != 1:
                    raise DataFormatError(f"{path}: a DatasetDict with splits {sorted(ds)}; give the data setting as "
                                          f"{{path: {path}, split: <name>}}")
                ds = next(iter(ds.values()))
        else:
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        return ds.to_list()
    except DataFormatError:
        raise
    except Exception as err:  # datasets and pyarrow raise many types; the user needs the file named
        raise DataFormatError(f"{path}: cannot be read ({type(err).__name__}: {err})") from err


def _tsv(path: Path) -> list[dict]:
    return _csv(path, delimiter="\t")


def _folder(path: Path) -> list[dict]:
    """A folder written by ``save_to_disk``, or of data files of one type (read in name order, rows concatenated)."""
    if any((path / f).exists() for f in ("dataset_dict.json", "state.json", "dataset_info.json")):
        return _with_datasets(path)
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in READERS)
    kinds = {f.suffix for f in files}
    if not files or len(kinds) > 1:
        raise DataFormatError(f"{path}: a data folder must hold files of one type ({', '.join(sorted(READERS))}) "
                              f"or a dataset saved with save_to_disk; found {sorted(kinds) or 'none'}")
    return [row for f in files for row in READERS[f.suffix](f)]


READERS = {".jsonl": _json_lines, ".json": _json, ".csv": _csv, ".tsv": _tsv, ".parquet": _with_datasets}


def _load_spec(spec: DatasetSpec) -> list[dict]:
    """Rows of a ``load_dataset`` spec (or a ``save_to_disk`` folder with a split); errors name the spec."""
    import datasets

    try:
        if Path(spec.path).is_dir() and any((Path(spec.path) / f).exists() for f in ("dataset_dict.json",
                                                                                      "state.json")):
            ds = datasets.load_from_disk(spec.path)
        else:
            ds = datasets.load_dataset(spec.path, spec.name, split=spec.split, data_files=spec.data_files,
                                       revision=spec.revision)
        if isinstance(ds, datasets.DatasetDict):
            if spec.split is None:
                raise DataFormatError(f"{spec}: the dataset has splits {sorted(ds)}; choose one with split: <name>")
            if spec.split not in ds:
                raise DataFormatError(f"{spec}: no split {spec.split!r}; the dataset has {sorted(ds)}")
            ds = ds[spec.split]
        return ds.to_list()
    except DataFormatError:
        raise
    except Exception as err:  # datasets raises many types; the user needs the spec named
        raise DataFormatError(f"{spec}: cannot be read ({type(err).__name__}: {err})") from err


def read_records(path: str | Path | DatasetSpec | dict) -> list[dict]:
    """All rows of a data file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``), a saved dataset folder, or a
    ``load_dataset`` spec (``DatasetSpec`` or its dict).

    JSON and CSV files are parsed as written, without type inference: CSV cells stay text, JSON values
    keep their JSON types (validation then names a row whose field has the wrong type).
    """
    if isinstance(path, dict):
        path = DatasetSpec(**path)
    if isinstance(path, DatasetSpec):
        rows = _load_spec(path)
        if not rows:
            raise DataFormatError(f"{path}: no rows; it needs at least one row")
        return rows
    p = Path(path)
    if not p.exists():
        raise DataFormatError(f"{p}: no such file or folder; check the data path in your config")
    reader = _folder if p.is_dir() else READERS.get(p.suffix)
    if reader is None:
        raise DataFormatError(f"{p}: unsupported file type {p.suffix!r}; use .jsonl, .json, .parquet, .csv, .tsv, a "
                              "folder of such files or one saved with Dataset.save_to_disk")
    rows = reader(p)
    if not rows:
        raise DataFormatError(f"{p}: no rows (the file is empty, blank or has only a header); it needs at least "
                              "one row")
    return rows


ROLES = ("system", "user", "assistant", "tool")


def _text(value, path, i: int, name: str) -> str:
    """A non-empty string, else a one-line error naming the file, row and field."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, str):
        raise DataFormatError(f"{path}: row {i + 1}: field {name!r} is empty; give it a non-empty text")
    kind = "NaN" if isinstance(value, float) and value != value else type(value).__name__
    raise DataFormatError(f"{path}: row {i + 1}: field {name!r} must be a non-empty string, got {kind} "
                          f"({value!r:.40})")


def _messages(value: list, path, i: int, name: str) -> list[dict]:
    """A chat: ``{role, content}`` messages, each role known and each content a non-empty string."""
    for j, m in enumerate(value):
        where = f"{name}[{j}]"
        if not isinstance(m, dict) or "content" not in m:
            raise DataFormatError(f"{path}: row {i + 1}: field {where!r} must be a {{role, content}} message, got "
                                  f"{m!r:.60}")
        if m.get("role") not in ROLES:
            raise DataFormatError(f"{path}: row {i + 1}: field {where + '.role'!r} is {m.get('role')!r}; use one of "
                                  f"{', '.join(ROLES)}")
        _text(m["content"], path, i, f"{where}.content")
    return value


def _text_or_messages(value, path, i: int, name: str):
    if isinstance(value, list) and value:
        return _messages(value, path, i, name)
    if isinstance(value, str) or value is None or isinstance(value, float):
        return _text(value, path, i, name)
    raise DataFormatError(f"{path}: row {i + 1}: field {name!r} must be a non-empty string or a list of "
                          f"{{role, content}} messages, got {type(value).__name__} ({value!r:.40})")


def _ends_with_answer(msgs: list[dict], path, i: int, name: str) -> list[dict]:
    if msgs[-1].get("role") != "assistant":
        raise DataFormatError(f"{path}: row {i + 1}: field {name!r} must end with an assistant message (the "
                              f"response), not a {msgs[-1].get('role')!r} one")
    return msgs


def _key(value, path, i: int, name: str, default: str) -> str:
    """An id or subtask as a string: text or an integer (converted), ``default`` when absent; others refused."""
    if value is None or value == "":
        return default
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataFormatError(f"{path}: row {i + 1}: field {name!r} must be a string or an integer, got "
                          f"{type(value).__name__} ({value!r:.40})")


TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_label(value, path, i: int, name: str) -> bool | None:
    """A ground-truth boolean: true/false, 1/0, yes/no (any case, as text or JSON), None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise DataFormatError(f"{path}: row {i + 1}: field {name!r} is {value!r:.40}; a label must be true/false, 1/0 "
                          "or yes/no")


def _require(row: dict, key: str, path, i: int, hint: str):
    if key not in row or row[key] is None:
        raise DataFormatError(f"{path}: row {i + 1}: field {key!r} is missing; {hint}")
    return row[key]


def _ids_unique(ids: list[str], path) -> None:
    seen: dict[str, int] = {}
    for i, rid in enumerate(ids):
        if rid in seen:
            raise DataFormatError(f"{path}: row {i + 1}: duplicate id {rid!r} (first at row {seen[rid] + 1}); "
                                  "ids must be unique")
        seen[rid] = i


def sft_row(row: dict, i: int, path: str | Path, cols: Columns = DEFAULT_COLUMNS) -> SFTRow:
    """Validate one SFT record (prompt/completion, messages or text); ``i`` is its 0-based row number."""
    rid = _key(row.get(cols.id), path, i, cols.id, str(i))
    sub = _key(row.get(cols.subtask), path, i, cols.subtask, "all")
    known = {cols.id, cols.prompt, cols.completion, cols.messages, cols.text, cols.subtask}
    extra = {k: v for k, v in row.items() if k not in known}
    if row.get(cols.messages) is not None:
        msgs = _text_or_messages(row[cols.messages], path, i, cols.messages)
        if isinstance(msgs, str):
            raise DataFormatError(f"{path}: row {i + 1}: field {cols.messages!r} must be a list of {{role, content}} "
                                  "messages, the last the assistant's response")
        _ends_with_answer(msgs, path, i, cols.messages)
        if len(msgs) < 2:
            raise DataFormatError(f"{path}: row {i + 1}: field {cols.messages!r} holds only the answer; give the "
                                  "messages it answers before it")
        return SFTRow(rid, msgs[:-1], msgs[-1]["content"], sub, extra)
    if row.get(cols.prompt) is not None or row.get(cols.completion) is not None:
        hint = (f"SFT rows need {cols.prompt!r} and {cols.completion!r} (or {cols.messages!r}, or "
                f"{cols.text!r}); rename columns with data.columns")
        prompt = _text_or_messages(_require(row, cols.prompt, path, i, hint), path, i, cols.prompt)
        comp = _answer_text(_require(row, cols.completion, path, i, hint), path, i, cols.completion)
        return SFTRow(rid, prompt, comp, sub, extra)
    if row.get(cols.text) is not None:
        return SFTRow(rid, "", _text_or_messages(row[cols.text], path, i, cols.text), sub, extra)
    raise DataFormatError(
        f"{path}: row {i + 1}: no {cols.prompt!r}/{cols.completion!r}, {cols.messages!r} or "
        f"{cols.text!r} field (found {sorted(row)}); rename columns with data.columns")


def parse_sft(records: list[dict], path: str | Path, cols: Columns = DEFAULT_COLUMNS) -> list[SFTRow]:
    """Validate SFT rows (prompt/completion, messages or text) into ``SFTRow``s."""
    if not records:
        raise DataFormatError(f"{path}: the dataset is empty; it needs at least one row")
    out = [sft_row(row, i, path, cols) for i, row in enumerate(records)]
    _ids_unique([r.id for r in out], path)
    return out


def _answer_text(value, path, i: int, name: str) -> str:
    """A response given as text, or as TRL's conversational completion: one assistant message."""
    value = _text_or_messages(value, path, i, name)
    if isinstance(value, str):
        return value
    if len(value) != 1 or value[0].get("role") != "assistant":
        raise DataFormatError(f"{path}: row {i + 1}: field {name!r} as a message list must hold exactly one "
                              "assistant message (TRL's conversational prompt-completion format)")
    return _text_or_messages(value[0]["content"], path, i, f"{name}[0].content")


def _answer(value):
    """The response text of a chosen/rejected value (string or message list)."""
    return value if isinstance(value, str) else value[-1]["content"]


def parse_pairs(records: list[dict], path: str | Path, cols: Columns = DEFAULT_COLUMNS) -> list[PairRow]:
    """Validate preference pairs (TRL ``prompt``/``chosen``/``rejected``) into ``PairRow``s."""
    if not records:
        raise DataFormatError(f"{path}: the dataset is empty; it needs at least one pair")
    out: list[PairRow] = []
    hint = (f"preference pairs need {cols.prompt!r}, {cols.chosen!r} and {cols.rejected!r}; "
            "rename columns with data.columns")
    for i, row in enumerate(records):
        rid = _key(row.get(cols.id), path, i, cols.id, str(i))
        chosen = _text_or_messages(_require(row, cols.chosen, path, i, hint), path, i, cols.chosen)
        rejected = _text_or_messages(_require(row, cols.rejected, path, i, hint), path, i, cols.rejected)
        for name, value in ((cols.chosen, chosen), (cols.rejected, rejected)):
            if isinstance(value, list):
                _ends_with_answer(value, path, i, name)
        if isinstance(chosen, list) and row.get(cols.prompt) is None:
            prompt = chosen[:-1]
        else:
            prompt = _text_or_messages(_require(row, cols.prompt, path, i, hint), path, i, cols.prompt)
        if _answer(chosen).strip() == _answer(rejected).strip():
            raise DataFormatError(f"{path}: row {i + 1}: {cols.chosen!r} equals {cols.rejected!r}; a pair "
                                  "must contrast two different responses (drop or fix the row)")
        if isinstance(prompt, list) and prompt and prompt[-1].get("role") == "assistant":
            raise DataFormatError(f"{path}: row {i + 1}: field {cols.prompt!r} ends with an assistant message; "
                                  "the prompt is what the model answers (end it with a user turn)")
        out.append(PairRow(rid, prompt, _answer(chosen), _answer(rejected),
                           _key(row.get(cols.subtask), path, i, cols.subtask, "all")))
    _ids_unique([r.id for r in out], path)
    return out


class RowsDigest:
    """sha256 of parsed rows (ids, texts, subtasks and extra columns), fed one row at a time."""

    def __init__(self):
        self._h = hashlib.sha256()

    def add(self, row: SFTRow | PairRow) -> None:
        self._h.update(json.dumps(asdict(row), sort_keys=True, default=str).encode() + b"\n")

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def rows_digest(rows: Iterable[SFTRow] | Iterable[PairRow]) -> str:
    """What a selection or a store was made from: ``RowsDigest`` of every row, in order."""
    digest = RowsDigest()
    for row in rows:
        digest.add(row)
    return digest.hexdigest()


def iter_records(path: str | Path | DatasetSpec) -> Iterator[dict]:
    """The records of a data file one at a time: JSONL and CSV are streamed; other formats are read whole."""
    p = Path(path) if isinstance(path, str | Path) else None
    if p is not None and p.suffix == ".jsonl" and p.is_file():
        yield from _json_objects(p)
        return
    yield from read_records(path)


@dataclass
class PoolIndex:
    """What selection needs from a pool, read in one streaming pass (no tokenization, no texts kept).

    ``subtasks`` [n] are codes into ``subtask_names``; ``labels`` [n] is the ground-truth column as
    booleans (None when some row lacks it); ``digest`` is ``rows_digest`` of the parsed rows.
    """

    path: str | Path | DatasetSpec
    cols: Columns
    rows: int
    digest: str
    subtask_names: list[str]
    subtasks: torch.Tensor
    labels: torch.Tensor | None

    rows_in_memory: list[SFTRow] | None = None

    @classmethod
    def scan(cls, path: str | Path, cols: Columns = DEFAULT_COLUMNS, label: str | None = None) -> PoolIndex:
        """Read a pool file once, keeping only what selection needs."""
        rows = (sft_row(record, i, path, cols) for i, record in enumerate(iter_records(path)))
        return cls._index(rows, path, cols, label)._unique()

    @classmethod
    def from_rows(cls, rows: list[SFTRow], label: str | None = None) -> PoolIndex:
        """An index of rows already in memory (the Python API, tests)."""
        index = cls._index(iter(rows), "<rows>", DEFAULT_COLUMNS, label)
        index.rows_in_memory = rows
        return index._unique()

    @classmethod
    def _index(cls, rows: Iterator[SFTRow], path, cols: Columns, label: str | None) -> PoolIndex:
        digest, names, codes, labels, hashes = RowsDigest(), {}, array("i"), bytearray(), array("q")
        missing_label = label is None
        n = 0
        for i, row in enumerate(rows):
            digest.add(row)
            codes.append(names.setdefault(row.subtask, len(names)))
            hashes.append(int.from_bytes(hashlib.blake2b(row.id.encode(), digest_size=8).digest(), "little",
                                         signed=True))
            value = parse_label(row.extra.get(label), path, i, label) if label else None
            missing_label = missing_label or value is None
            labels.append(bool(value))
            n = i + 1
        if not n:
            raise DataFormatError(f"{path}: no rows; it needs at least one row")
        index = cls(path, cols, n, digest.hexdigest(), list(names), torch.frombuffer(codes, dtype=torch.int32).clone(),
                    None if missing_label else torch.frombuffer(labels, dtype=torch.uint8).bool())
        index._id_hashes = torch.frombuffer(hashes, dtype=torch.int64).clone()
        return index

    def _unique(self) -> PoolIndex:
        """Refuse duplicate ids (8-byte hashes compared; a second pass names the rows)."""
        if torch.unique(self._id_hashes).numel() != self.rows:
            _ids_unique([row.id for row in self.iter_rows()], self.path)
        del self._id_hashes
        return self

    def iter_rows(self) -> Iterator[SFTRow]:
        """The pool's rows again, in order (for writing outputs)."""
        if self.rows_in_memory is not None:
            yield from self.rows_in_memory
            return
        for i, record in enumerate(iter_records(self.path)):
            yield sft_row(record, i, self.path, self.cols)


def load_sft(path: str | Path | DatasetSpec, cols: Columns = DEFAULT_COLUMNS) -> list[SFTRow]:
    """Read and validate an SFT file."""
    return parse_sft(read_records(path), path, cols)


def load_pairs(path: str | Path | DatasetSpec, cols: Columns = DEFAULT_COLUMNS) -> list[PairRow]:
    """Read and validate a preference-pair file."""
    return parse_pairs(read_records(path), path, cols)
