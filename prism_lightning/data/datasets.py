"""Torch datasets over encoded rows, and their collate functions."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from prism_lightning.data.tokenize import Encoded, pack_batch, pad_batch


def token_lengths(encoded, rows: range | None = None) -> list[int]:
    """Tokens per encoded row (of ``rows``, default all): ``EncodedRows.lengths`` or a list of ``Encoded``."""
    if hasattr(encoded, "lengths"):
        return encoded.lengths(rows)
    return [len(encoded[i].input_ids) for i in (rows if rows is not None else range(len(encoded)))]


class SFTDataset(Dataset):
    """Encoded SFT rows; an item is ``(row_index, Encoded)`` (the index into the source file).

    ``lengths()`` gives each item's tokens and ``rows_per_item`` the rows it adds to a batch (1), which
    length-aware batching uses to count padded tokens.
    """

    rows_per_item = 1

    def __init__(self, encoded: list[Encoded], indices: list[int] | None = None):
        self.encoded = encoded
        self.indices = list(range(len(encoded))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Encoded]:
        j = self.indices[i]
        return j, self.encoded[j]

    def lengths(self, positions: range | None = None) -> list[int]:
        """Tokens of each item (of ``positions``, default all), in item order."""
        rows = [self.indices[p] for p in (positions if positions is not None else range(len(self)))]
        if rows and rows[-1] - rows[0] == len(rows) - 1 and rows == sorted(rows):  # contiguous: a slice
            return token_lengths(self.encoded, range(rows[0], rows[-1] + 1))
        every = token_lengths(self.encoded)
        return [every[j] for j in rows]


class PairDataset(Dataset):
    """Encoded preference pairs; an item is ``(row_index, chosen, rejected)``: two rows of a batch, padded
    to the longer of the two (``lengths()``)."""

    rows_per_item = 2

    def __init__(self, chosen: list[Encoded], rejected: list[Encoded]):
        self.chosen, self.rejected = chosen, rejected

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, i: int) -> tuple[int, Encoded, Encoded]:
        return i, self.chosen[i], self.rejected[i]

    def lengths(self, positions: range | None = None) -> list[int]:
        """The longer answer's tokens of each pair (of ``positions``, default all)."""
        return [max(c, r) for c, r in zip(token_lengths(self.chosen, positions),
                                          token_lengths(self.rejected, positions))]


def _prompt_ids(e: Encoded) -> list[int]:
    return list(e.input_ids[: e.prompt_len])


class SFTCollator:
    """Batch of SFT rows: padded ``input_ids``/``attention_mask``/``labels`` and ``index`` [B].

    With ``rows`` (evaluation) also each row's ``subtask``, ``prompt_ids`` (the prompt as training tokenizes
    it) and reference ``answer`` text, so a module evaluates a batch without reading the data module's rows.
    ``packed``: the rows as one sequence without padding (``tokenize.pack_batch``) instead.
    """

    def __init__(self, pad_id: int, rows: list | None = None, packed: bool = False):
        self.pad_id, self.rows, self.packed = pad_id, rows, packed

    def __call__(self, items: list[tuple[int, Encoded]]) -> dict:
        seqs = [e for _, e in items]
        batch = pack_batch(seqs) if self.packed else pad_batch(seqs, self.pad_id)
        batch["index"] = torch.tensor([i for i, _ in items], dtype=torch.long)
        if self.rows is not None:
            batch["subtask"] = [self.rows[i].subtask for i, _ in items]
            batch["prompt_ids"] = [_prompt_ids(e) for _, e in items]
            batch["answer"] = [self.rows[i].completion for i, _ in items]
        return batch


class PairCollator:
    """Batch of B pairs as 2B rows: chosen rows first, then rejected; ``index`` [B].

    With ``rows`` (evaluation) also each pair's ``subtask``, ``prompt_ids`` and ``chosen``/``rejected`` texts;
    ``packed``: the 2B rows as one sequence without padding instead.
    """

    def __init__(self, pad_id: int, rows: list | None = None, packed: bool = False):
        self.pad_id, self.rows, self.packed = pad_id, rows, packed

    def __call__(self, items: list[tuple[int, Encoded, Encoded]]) -> dict:
        seqs = [c for _, c, _ in items] + [r for _, _, r in items]
        batch = pack_batch(seqs) if self.packed else pad_batch(seqs, self.pad_id)
        batch["index"] = torch.tensor([i for i, _, _ in items], dtype=torch.long)
        batch["pairs"] = torch.tensor(len(items))
        if self.rows is not None:
            batch["subtask"] = [self.rows[i].subtask for i, _, _ in items]
            batch["prompt_ids"] = [_prompt_ids(c) for _, c, _ in items]
            batch["chosen"] = [self.rows[i].chosen for i, _, _ in items]
            batch["rejected"] = [self.rows[i].rejected for i, _, _ in items]
        return batch
