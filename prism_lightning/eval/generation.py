"""Greedy-generation exact match, per subtask."""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from prism_lightning.data.tokenize import prompt_ids


def extract_answer(text: str, pattern: str | None = None) -> str:
    """The answer inside ``text``: first group of ``pattern`` if given (else the whole text), stripped."""
    text = text.strip()
    if pattern:
        m = re.search(pattern, text)
        return (m.group(1) if m.groups() else m.group(0)).strip() if m else ""
    return text


def greedy_generate(model, tokenizer, prompts: list, max_new_tokens: int = 16, batch_size: int = 32) -> list[str]:
    """Greedy continuations of each prompt, tokenized exactly as training tokenizes it
    (``data.tokenize.prompt_ids``: a chat prompt through its template, with the template's BOS only)."""
    return greedy_generate_ids(model, tokenizer, [prompt_ids(tokenizer, p) for p in prompts], max_new_tokens,
                               batch_size)


@torch.no_grad()
def greedy_generate_ids(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 16,
                        batch_size: int = 32) -> list[str]:
    """Greedy continuations of prompts given as token ids (left-padded batches), decoded without special tokens.

    With several processes every rank keeps stepping until all are done (``synced_gpus``), as a sharded
    (FSDP) model needs every rank in each forward.
    """
    device = next(model.parameters()).device
    synced = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    pad = tokenizer.pad_token_id
    outs: list[str] = []
    for s in range(0, len(prompts), batch_size):
        ids = prompts[s: s + batch_size]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             synced_gpus=synced)
        outs += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return outs


def pair_choice(generation: str, chosen: str, rejected: str) -> str:
    """Which answer a generation follows where ``chosen`` and ``rejected`` first differ.

    Returns ``"chosen"``, ``"rejected"`` or ``"other"`` (it left their common prefix, or took a third
    way at the divergence). The decision a pair contrasts is measured, not the rest of the text:
    for "No, 45 is more than 11." vs "Yes, 45 is less than 11." it is the first character (agree or
    correct), for "56" vs "57" the second digit. The end of a text counts as a character, so a
    pair whose answers differ only by a suffix is decided by whether the generation stops.
    """
    g, c, r = generation.strip(), chosen.strip(), rejected.strip()
    d = 0
    while d < min(len(c), len(r)) and c[d] == r[d]:
        d += 1
    if g[:d] != c[:d]:
        return "other"
    nxt = g[d:d + 1]
    if nxt == c[d:d + 1]:
        return "chosen"
    if nxt == r[d:d + 1]:
        return "rejected"
    return "other"


def exact_match_by_subtask(predictions: list[str], references: list[str], subtasks: list[str],
                           pattern: str | None = None) -> dict[str, float]:
    """``{subtask: mean[extract(pred) == extract(ref)]}`` plus ``all``."""
    hits: dict[str, list[float]] = defaultdict(list)
    for pred, ref, sub in zip(predictions, references, subtasks):
        ok = float(extract_answer(pred, pattern) == extract_answer(ref, pattern))
        hits[sub].append(ok)
        hits["all"].append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}
