"""Measure the tiny model per demo skill and write the numbers into its model card.

Run: ``python tools/assets/measure_tiny_model.py`` (greedy decoding; a few seconds). It prints, and
writes into ``assets/tiny-llama/README.md`` and ``accuracy.json``:

- greedy exact match per skill on ``eval.jsonl``;
- behaviour on the held-out pairs of ``eval_pairs.jsonl``: the share of prompts whose greedy answer
  takes the wanted (chosen) or the unwanted (rejected) way where the two first differ;
- the preconditions of the demo's experiments, measured on the base model: how plausible each
  contamination is (AUROC of the per-row loss for the injected rows, within the contaminated
  skill: about 0.5 means the harmful rows are as plausible to the model as the clean ones), and
  the preference weight pi = sigmoid(lbar(chosen) - lbar(rejected)) of each target set.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prism_lightning import DEMO_DATA, TINY_MODEL
from prism_lightning.data.formats import load_pairs, load_sft
from prism_lightning.data.tokenize import Encoder, pad_batch
from prism_lightning.eval.generation import exact_match_by_subtask, greedy_generate, pair_choice
from prism_lightning.eval.ranking import harm_metrics
from prism_lightning.influence.objective import mean_logprob

CARD = """---
license: apache-2.0
library_name: transformers
tags: [llama, tiny, prism-lightning]
---
# tiny-llama (prism_lightning demo model)

A {params:.2f}M-parameter Llama ({layers} layers, hidden {hidden}, {heads} heads, vocab {vocab}: a
byte-level BPE with one token per digit) pretrained from scratch by `tools/assets/build_tiny_model.py`
on rows of the demo skills that appear in no committed data file (`tools/assets/build_demo_data.py`).
Its pretraining mix leaves it ambivalent about two behaviours: it agrees with close wrong claims
and corrects far ones (`claim`), and it copies words it is asked to reverse (`reverse`).
Loaded like any hub model: `AutoModelForCausalLM.from_pretrained(path)`.

Measured by `tools/assets/measure_tiny_model.py` (greedy decoding, `assets/data/`):

| skill | exact match | eval rows | wanted answer | unwanted answer | eval pairs |
| --- | --- | --- | --- | --- | --- |
{rows}

"wanted"/"unwanted": share of held-out pairs whose greedy answer follows the chosen / rejected
answer where the two first differ (claim: corrects / agrees with a wrong claim; reverse: reverses
/ copies; add: the right / the pair's wrong digit).

Preconditions of the demo experiments, on this base model:

| contamination | skill | harmful rows | loss AUROC within skill |
| --- | --- | --- | --- |
{regime}

| target set | pairs | mean pi | pairs with pi > 0.5 |
| --- | --- | --- | --- |
{weights}
"""


@torch.no_grad()
def row_lbar(model, tokenizer, prompts: list, answers: list[str], max_length: int = 64,
             batch_size: int = 64) -> torch.Tensor:
    """Length-normalised log-likelihood of each answer given its prompt, encoded as the pipeline does."""
    enc = Encoder(tokenizer, max_length)
    rows = [enc.encode(p, a, f"row {i + 1}") for i, (p, a) in enumerate(zip(prompts, answers))]
    out = []
    for s in range(0, len(rows), batch_size):
        batch = pad_batch(rows[s: s + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out.append(mean_logprob(logits, batch["labels"]).double())
    return torch.cat(out)


def measure(model, tokenizer, data: Path) -> dict:
    """Every number of the model card, as a dict."""
    rows = load_sft(data / "eval.jsonl")
    preds = greedy_generate(model, tokenizer, [r.prompt for r in rows], max_new_tokens=16)
    acc = exact_match_by_subtask(preds, [r.completion for r in rows], [r.subtask for r in rows])
    counts = {s: sum(r.subtask == s for r in rows) for s in acc} | {"all": len(rows)}
    pairs = load_pairs(data / "eval_pairs.jsonl")
    gens = greedy_generate(model, tokenizer, [p.prompt for p in pairs], max_new_tokens=16)
    behaviour: dict[str, dict[str, float]] = {}
    for sub in sorted({p.subtask for p in pairs}):
        picks = [pair_choice(g, p.chosen, p.rejected) for g, p in zip(gens, pairs) if p.subtask == sub]
        behaviour[sub] = {k: picks.count(k) / len(picks) for k in ("chosen", "rejected", "other")}
        behaviour[sub]["pairs"] = len(picks)
    regime = {}
    for name in sorted(p.name for p in data.glob("pool_*.jsonl")):
        pool = load_sft(data / name)
        harmful = torch.tensor([bool(r.extra.get("harmful")) for r in pool])
        skills = {r.subtask for r, h in zip(pool, harmful.tolist()) if h}
        inside = torch.tensor([r.subtask in skills for r in pool])
        lbar = row_lbar(model, tokenizer, [r.prompt for r in pool], [r.completion for r in pool])
        # the loss baseline's score is -loss = lbar: harmful rows are found if they have low lbar
        m = harm_metrics(lbar[inside], harmful[inside], int(harmful.sum()))
        regime[name] = {"skill": ",".join(sorted(skills)), "harmful": int(harmful.sum()), "loss_auroc": m["auroc"]}
    weights = {}
    for name in sorted(p.name for p in data.glob("target_*.jsonl")):
        t = load_pairs(data / name)
        prompts = [p.prompt for p in t]
        pi = torch.sigmoid(row_lbar(model, tokenizer, prompts, [p.chosen for p in t])
                           - row_lbar(model, tokenizer, prompts, [p.rejected for p in t]))
        weights[name] = {"pairs": len(t), "mean_pi": float(pi.mean()),
                         "share_above_half": float((pi > 0.5).double().mean())}
    return {"exact_match": acc, "eval_rows": counts, "behaviour": behaviour, "regime": regime, "weights": weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY_MODEL)
    parser.add_argument("--data", type=Path, default=Path(DEMO_DATA))
    parser.add_argument("--no-card", action="store_true", help="print only, do not rewrite README.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    m = measure(model, tok, args.data)
    print(json.dumps(m, indent=2))
    if args.no_card:
        return
    cfg, b = model.config, m["behaviour"]
    table = "\n".join(
        f"| {s} | {m['exact_match'][s]:.1%} | {m['eval_rows'][s]} | "
        + (f"{b[s]['chosen']:.1%} | {b[s]['rejected']:.1%} | {b[s]['pairs']} |" if s in b else "– | – | – |")
        for s in m["exact_match"])
    regime = "\n".join(f"| `{k}` | {v['skill']} | {v['harmful']} | {v['loss_auroc']:.3f} |"
                       for k, v in m["regime"].items())
    weights = "\n".join(f"| `{k}` | {v['pairs']} | {v['mean_pi']:.3f} | {v['share_above_half']:.0%} |"
                        for k, v in m["weights"].items())
    card = CARD.format(params=sum(p.numel() for p in model.parameters()) / 1e6, layers=cfg.num_hidden_layers,
                       hidden=cfg.hidden_size, heads=cfg.num_attention_heads, vocab=cfg.vocab_size, rows=table,
                       regime=regime, weights=weights)
    (Path(args.model) / "README.md").write_text(card)
    (Path(args.model) / "accuracy.json").write_text(json.dumps(m, indent=2) + "\n")


if __name__ == "__main__":
    main()
