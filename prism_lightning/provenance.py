"""What an output was made from, and the one check that refuses anything else.

Every output a stage trusts later (a stage folder, a feature store, curvature factors, a selection, a
warmup checkpoint) has a JSON manifest beside it recording the settings and the digests of the inputs
it was made from. ``Manifest.check(expected, keys)`` is the only comparison: it names every key whose
recorded value differs from the one in use (nested keys dotted, ``projection.dim``), recorded vs now,
and the fix, in one message. A manifest that is not valid JSON is refused naming its file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from prism_lightning.errors import ProvenanceError, StoreCorruptError
from prism_lightning.io import atomic_write_text, read_json


def plain_json(obj):
    """``obj`` as it reads back from JSON (tuples become lists, other values their ``str``)."""
    return json.loads(json.dumps(obj, default=str))


def _short(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _flat(value, prefix: str) -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out |= _flat(v, f"{prefix}.{k}")
        return out
    return {prefix: value}


def differences(recorded: dict, expected: dict, keys: Iterable[str] | None = None) -> list[str]:
    """``"key: recorded X, now Y"`` for every key (of ``keys``, default all of ``expected``) that differs;
    nested dicts are compared key by key and named with dots."""
    out = []
    for key in (expected if keys is None else keys):
        was, now = plain_json(recorded.get(key)), plain_json(expected.get(key))
        if was == now:
            continue
        if isinstance(was, dict) and isinstance(now, dict):
            a, b = _flat(was, key), _flat(now, key)
            out += [f"{k}: recorded {_short(a.get(k))}, now {_short(b.get(k))}"
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            out.append(f"{key}: recorded {_short(was)}, now {_short(now)}")
    return out


class Manifest:
    """A JSON record of what an output was made from (``path``), and its one check.

    ``Manifest.read(path)`` returns None when there is none; ``check`` refuses a difference;
    ``write`` replaces the file atomically.
    """

    def __init__(self, path: str | Path, data: dict):
        self.path, self.data = Path(path), dict(data)

    @classmethod
    def read(cls, path: str | Path) -> Manifest | None:
        path = Path(path)
        data = read_json(path)
        if data is None:
            return None
        if not isinstance(data, dict):
            raise StoreCorruptError(f"{path} holds a JSON {type(data).__name__}, not a record; delete it and rerun "
                                    "the stage that writes it")
        return cls(path, data)

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    def __getitem__(self, key: str):
        return self.data[key]

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def check(self, expected: dict, keys: Iterable[str] | None = None, *, fix: str,
              what: str | None = None, error: type[ProvenanceError] = ProvenanceError) -> None:
        """Refuse (``error``) when a recorded value of ``keys`` (default: every key of ``expected``) differs.

        The message: ``<what>: made from other settings or inputs than now: k: recorded X, now Y; ...; <fix>``.
        """
        diffs = differences(self.data, expected, keys)
        if diffs:
            more = f"; and {len(diffs) - 8} more" if len(diffs) > 8 else ""
            raise error(f"{what or self.path.parent}: made from other settings or inputs than now ("
                        f"{'; '.join(diffs[:8])}{more}); {fix}")

    def write(self) -> Manifest:
        atomic_write_text(self.path, json.dumps(self.data, indent=2, default=str))
        return self
