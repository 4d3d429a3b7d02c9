"""Torch datasets over encoded rows, and their collate functions."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from prism_lightning.data.tokenize import Encoded, pad_batch


class SFTDataset(Dataset):
    """Encoded SFT rows; an item is ``(row_index, Encoded)`` (the index into the source file)."""

    def __init__(self, encoded: list[Encoded], indices: list[int] | None = None):
        self.encoded = encoded
        self.indices = list(range(len(encoded))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Encoded]:
        j = self.indices[i]
        return j, self.encoded[j]


class PairDataset(Dataset):
    """Encoded preference pairs; an item is ``(row_index, chosen, rejected)``."""

    def __init__(self, chosen: list[Encoded], rejected: list[Encoded]):
        self.chosen, self.rejected = chosen, rejected

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, i: int) -> tuple[int, Encoded, Encoded]:
        return i, self.chosen[i], self.rejected[i]


class SFTCollator:
    """Batch of SFT rows: padded ``input_ids``/``attention_mask``/``labels`` and ``index`` [B]."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[int, Encoded]]) -> dict[str, torch.Tensor]:
        batch = pad_batch([e for _, e in items], self.pad_id)
        batch["index"] = torch.tensor([i for i, _ in items], dtype=torch.long)
        return batch


class PairCollator:
    """Batch of B pairs as 2B rows: chosen rows first, then rejected; ``index`` [B]."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[int, Encoded, Encoded]]) -> dict[str, torch.Tensor]:
        batch = pad_batch([c for _, c, _ in items] + [r for _, _, r in items], self.pad_id)
        batch["index"] = torch.tensor([i for i, _, _ in items], dtype=torch.long)
        batch["pairs"] = torch.tensor(len(items))
        return batch
