"""Greedy-generation exact match, per subtask."""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from prism_lightning.data.tokenize import render_prompt


def extract_answer(text: str, pattern: str | None = None) -> str:
    """The answer inside ``text``: first group of ``pattern`` if given (else the whole text), stripped."""
    text = text.strip()
    if pattern:
        m = re.search(pattern, text)
        return (m.group(1) if m.groups() else m.group(0)).strip() if m else ""
    return text


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list, max_new_tokens: int = 16,
                    batch_size: int = 32) -> list[str]:
    """Greedy continuations of each prompt (left-padded batches), decoded without special tokens.

    With several processes every rank keeps stepping until all are done (``synced_gpus``), as a
    sharded (FSDP) model needs every rank in each forward.
    """
    device = next(model.parameters()).device
    synced = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    outs: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for s in range(0, len(prompts), batch_size):
            texts = [render_prompt(tokenizer, p) for p in prompts[s: s + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 synced_gpus=synced)
            outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
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
