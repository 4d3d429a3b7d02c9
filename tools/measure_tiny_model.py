"""Measure the tiny model's exact-match accuracy per demo skill and write it into its model card.

Run: ``python tools/measure_tiny_model.py`` (greedy decoding on ``assets/data/eval.jsonl``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prism_lightning import DEMO_DATA, TINY_MODEL
from prism_lightning.data.formats import load_sft
from prism_lightning.eval.generation import exact_match_by_subtask, greedy_generate

CARD = """---
license: apache-2.0
library_name: transformers
tags: [llama, tiny, prism-lightning]
---
# tiny-llama (prism_lightning demo model)

A {params:.2f}M-parameter Llama ({layers} layers, hidden {hidden}, {heads} heads, vocab {vocab}: a
byte-level BPE with one token per digit) pretrained from scratch by `tools/build_tiny_model.py`
on rows of the demo skills that appear in no committed data file. It partly solves each skill so
that LoRA warmup, likelihoods and preferences mean something. Loaded like any hub model:
`AutoModelForCausalLM.from_pretrained(path)`.

## Measured accuracy (greedy exact match on `assets/data/eval.jsonl`, `tools/measure_tiny_model.py`)

| skill | exact match | rows |
| --- | --- | --- |
{rows}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY_MODEL)
    parser.add_argument("--data", default=f"{DEMO_DATA}/eval.jsonl")
    parser.add_argument("--no-card", action="store_true", help="print only, do not rewrite README.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    rows = load_sft(args.data)
    preds = greedy_generate(model, tok, [r.prompt for r in rows], max_new_tokens=16)
    acc = exact_match_by_subtask(preds, [r.completion for r in rows], [r.subtask for r in rows])
    counts = {s: sum(r.subtask == s for r in rows) for s in acc}
    counts["all"] = len(rows)
    print(json.dumps(acc, indent=2))
    if not args.no_card:
        cfg = model.config
        table = "\n".join(f"| {s} | {acc[s]:.1%} | {counts[s]} |" for s in acc)
        card = CARD.format(params=sum(p.numel() for p in model.parameters()) / 1e6,
                           layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                           heads=cfg.num_attention_heads, vocab=cfg.vocab_size, rows=table)
        (Path(args.model) / "README.md").write_text(card)
        (Path(args.model) / "accuracy.json").write_text(json.dumps(acc, indent=2) + "\n")


if __name__ == "__main__":
    main()
