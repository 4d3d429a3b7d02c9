"""Reading and validating SFT rows and preference pairs from user files.

Accepted files: JSONL/JSON, Parquet, CSV (read with ``datasets``) or a folder written by
``Dataset.save_to_disk``. Accepted rows:

- SFT: ``prompt`` + ``completion``; or chat ``messages`` (list of ``{role, content}``, the
  last one the assistant's answer); or ``text`` (loss on every token).
- Preference pairs (TRL convention): ``prompt``, ``chosen``, ``rejected``; ``chosen`` and
  ``rejected`` may be strings or message lists (the last assistant message is the answer).

Optional columns: ``id`` (defaults to the row number), ``subtask`` (defaults to ``"all"``)
and any ground-truth column (e.g. ``harmful``) that only evaluation reads.
Every problem is reported with file, row and field before any compute is spent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from prism_lightning.config import Columns
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


def _check_utf8_jsonl(path: Path) -> None:
    """Name the line of a non-UTF-8 byte or of a broken JSON record."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(f"{path}: line {lineno}: not valid UTF-8 ({err.reason} at byte "
                                      f"{err.start}); re-encode the file as UTF-8") from None
            if path.suffix == ".jsonl" and line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataFormatError(f"{path}: line {lineno}: invalid JSON ({err.msg}); "
                                          "each line must be one JSON object") from None


def read_records(path: str | Path) -> list[dict]:
    """All rows of a data file or saved dataset as dicts, through ``datasets``."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise DataFormatError(f"{p}: no such file or folder; check the data path in your config")
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    else:
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(p.suffix)
        if kind is None:
            raise DataFormatError(f"{p}: unsupported file type {p.suffix!r}; use .jsonl, .json, "
                                  ".parquet, .csv or a folder saved with Dataset.save_to_disk")
        if kind in ("json", "csv"):
            _check_utf8_jsonl(p)
        if p.stat().st_size == 0:
            raise DataFormatError(f"{p}: the file is empty; it needs at least one row")
        ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    rows = ds.to_list()
    if not rows:
        raise DataFormatError(f"{p}: the dataset is empty; it needs at least one row")
    return rows


def _text_or_messages(value, path, i: int, name: str):
    if isinstance(value, str):
        if not value.strip():
            raise DataFormatError(f"{path}: row {i + 1}: field {name!r} is empty; give it a non-empty text")
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return value
    raise DataFormatError(f"{path}: row {i + 1}: field {name!r} must be a non-empty string or a list of "
                          f"{{role, content}} messages, got {type(value).__name__}")


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


def parse_sft(records: list[dict], path: str | Path, cols: Columns = DEFAULT_COLUMNS) -> list[SFTRow]:
    """Validate SFT rows (prompt/completion, messages or text) into ``SFTRow``s."""
    if not records:
        raise DataFormatError(f"{path}: the dataset is empty; it needs at least one row")
    out: list[SFTRow] = []
    for i, row in enumerate(records):
        rid = str(row.get(cols.id, i)) if row.get(cols.id) is not None else str(i)
        sub = str(row.get(cols.subtask) or "all")
        known = {cols.id, cols.prompt, cols.completion, cols.messages, cols.text, cols.subtask}
        extra = {k: v for k, v in row.items() if k not in known}
        if row.get(cols.messages) is not None:
            msgs = _text_or_messages(row[cols.messages], path, i, cols.messages)
            if isinstance(msgs, str) or msgs[-1].get("role") != "assistant":
                raise DataFormatError(f"{path}: row {i + 1}: field {cols.messages!r} must end with an "
                                      "assistant message (the response to learn)")
            out.append(SFTRow(rid, msgs[:-1], msgs[-1]["content"], sub, extra))
        elif row.get(cols.prompt) is not None or row.get(cols.completion) is not None:
            hint = (f"SFT rows need {cols.prompt!r} and {cols.completion!r} (or {cols.messages!r}, or "
                    f"{cols.text!r}); rename columns with data.columns")
            prompt = _text_or_messages(_require(row, cols.prompt, path, i, hint), path, i, cols.prompt)
            comp = _text_or_messages(_require(row, cols.completion, path, i, hint), path, i, cols.completion)
            out.append(SFTRow(rid, prompt, comp, sub, extra))
        elif row.get(cols.text) is not None:
            out.append(SFTRow(rid, "", _text_or_messages(row[cols.text], path, i, cols.text), sub, extra))
        else:
            raise DataFormatError(
                f"{path}: row {i + 1}: no {cols.prompt!r}/{cols.completion!r}, {cols.messages!r} or "
                f"{cols.text!r} field (found {sorted(row)}); rename columns with data.columns")
    _ids_unique([r.id for r in out], path)
    return out


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
        rid = str(row[cols.id]) if row.get(cols.id) is not None else str(i)
        chosen = _text_or_messages(_require(row, cols.chosen, path, i, hint), path, i, cols.chosen)
        rejected = _text_or_messages(_require(row, cols.rejected, path, i, hint), path, i, cols.rejected)
        if isinstance(chosen, list) and row.get(cols.prompt) is None:
            prompt = chosen[:-1]
        else:
            prompt = _text_or_messages(_require(row, cols.prompt, path, i, hint), path, i, cols.prompt)
        if _answer(chosen).strip() == _answer(rejected).strip():
            raise DataFormatError(f"{path}: row {i + 1}: {cols.chosen!r} equals {cols.rejected!r}; a pair "
                                  "must contrast two different responses (drop or fix the row)")
        out.append(PairRow(rid, prompt, _answer(chosen), _answer(rejected),
                           str(row.get(cols.subtask) or "all")))
    _ids_unique([r.id for r in out], path)
    return out


def load_sft(path: str | Path, cols: Columns = DEFAULT_COLUMNS) -> list[SFTRow]:
    """Read and validate an SFT file."""
    return parse_sft(read_records(path), path, cols)


def load_pairs(path: str | Path, cols: Columns = DEFAULT_COLUMNS) -> list[PairRow]:
    """Read and validate a preference-pair file."""
    return parse_pairs(read_records(path), path, cols)
