"""Packed (padding-free) batches through a Hugging Face model: attention confined to each row.

A packed batch (``data.tokenize.pack_batch``) holds a batch's rows one after another in a single sequence, with
position ids restarting at 0 with each row and no padding. Flash-attention models read the row boundaries from the
position ids themselves (their ``varlen`` kernels); for every other attention implementation, and on CPU,
``packed_attention`` swaps in ``varlen_sdpa``, one causal ``scaled_dot_product_attention`` per row, so no token
attends across rows and no ``N x N`` mask over the whole pack is built.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

VARLEN = "prism_varlen_sdpa"
NATIVE_VARLEN = ("flash_attention_2", "flash_attention_3", "flash_attention_4")  # read packed position ids themselves


def varlen_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention inside each row of a packed sequence (``data.tokenize.pack_batch``), one
    ``scaled_dot_product_attention`` per row: the variable-length attention of flash-attention's ``varlen``
    kernels, for devices and models without them. ``query`` [1, heads, N, d], ``key``/``value`` [1, kv heads, N,
    d]; returns [1, N, heads, d] as Hugging Face's attention functions do. Nothing is computed across rows."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [query.shape[2]]
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling,
        dropout_p=dropout) for a, b in zip(starts[:-1], starts[1:])], dim=2)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs) -> None:
    return None  # varlen_sdpa confines attention to each row itself


def _register_varlen() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(VARLEN, varlen_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, _no_mask)


@contextmanager
def packed_attention(model: nn.Module) -> Iterator[None]:
    """Inside, forwards of ``model`` take packed batches (``position_ids`` restarting per row, no attention mask):
    a flash-attention model reads the row boundaries from the position ids itself, any other runs ``varlen_sdpa``."""
    config = model.config
    impl = config._attn_implementation
    if impl in NATIVE_VARLEN:
        yield
        return
    _register_varlen()
    config._attn_implementation = VARLEN
    try:
        yield
    finally:
        config._attn_implementation = impl
