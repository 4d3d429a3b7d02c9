"""The anchor study's mechanism (docs/evidence.md): how much of each target direction comes from the tokens the
wanted and the unwanted answer share, and how uncertain the model is about them.

    .venv/bin/python tools/evidence/anchor.py --run runs/evidence_anchor --experiments repair_unsigned
    .venv/bin/python tools/evidence/anchor.py --run runs/evidence --experiments repair_sycophancy

Reads a finished evidence run: per experiment and seed, the last warmup checkpoint and the target pairs the
run used. A pair's answers are aligned word by word (the same number of words: "signed: luz jls bdik" /
"unsigned: luz jls bdik", "No, 45 is more than 11." / "Yes, 45 is less than 11."); a token is *shared* when
its characters lie in words both answers have at the same place, *decisive* otherwise (the end-of-text token
counts as shared). Per pair, the length-normalised log-likelihood splits as ``lbar = lbar_shared +
lbar_decisive`` (each the sum over its tokens divided by the answer's length), and so do the exact LoRA
gradients. Printed per seed, and written to ``<run>/anchor.json``:

- the mean per-token loss on shared and on decisive tokens of the chosen answers;
- ``shared share of chosen``: ``|sum_q grad shared(y+_q)| / |sum_q grad lbar(y+_q)|``, the part of a
  chosen-only direction (as ``less`` aggregates it) that the shared tokens make;
- ``shared share of contrast``: the same for ``sum_q grad (lbar(y+_q) - lbar(y-_q))``, the contrast prism takes
  (the shared tokens cancel there except through their different context).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from first_order import last_checkpoint  # this folder's tool: the newest complete warmup checkpoint
from transformers import AutoTokenizer

from prism_lightning.config import LoraArgs, ModelArgs
from prism_lightning.data.formats import load_pairs
from prism_lightning.data.tokenize import Encoder
from prism_lightning.eval.first_order import flat_grad, lora_parameters
from prism_lightning.modeling import build_model


def shared_chars(answer: str, other: str) -> list[bool]:
    """Per character of ``answer``: inside a word that ``other`` has at the same place (spaces count as shared)."""
    a, b = answer.split(" "), other.split(" ")
    flags: list[bool] = []
    for i, word in enumerate(a):
        same = len(a) == len(b) and b[i] == word
        flags += [same] * len(word) + ([True] if i < len(a) - 1 else [])
    return flags


def token_masks(tok, ids: list[int], answer: str, other: str) -> torch.Tensor:
    """``True`` per answer token whose characters are all shared (the end-of-text token is shared)."""
    flags, out, done = shared_chars(answer, other), [], 0
    for j in range(len(ids)):
        if ids[j] == tok.eos_token_id:
            out.append(True)
            continue
        upto = len(tok.decode(ids[: j + 1]))
        out.append(all(flags[done:upto]) if upto > done else True)
        done = upto
    return torch.tensor(out)


def token_logprobs(model, ids: list[int], prompt_len: int) -> torch.Tensor:
    """``log p(y_t | ...)`` of the answer tokens of one row."""
    x = torch.tensor([ids])
    logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
    return logp[prompt_len - 1:].gather(-1, x[0, prompt_len:].unsqueeze(-1)).squeeze(-1)


def measure(folder: Path) -> dict:
    settings = json.loads((folder / "warmup" / "stage.json").read_text())["settings"]
    ckpt = last_checkpoint(folder / "warmup")
    info = json.loads((ckpt / "checkpoint.json").read_text())
    model = build_model(ModelArgs(**info["model"]), LoraArgs(**info["lora"]), adapter_path=ckpt, trainable=True)
    model.eval()
    data = settings["data"]
    pairs = load_pairs(data["target"])
    tok = AutoTokenizer.from_pretrained(info["model"]["name_or_path"])
    enc = Encoder(tok, data["max_length"])
    params = lora_parameters(model)
    loss = {"shared": [], "decisive": []}
    sums = {k: 0.0 for k in ("chosen", "chosen_shared", "contrast", "contrast_shared")}
    for i, p in enumerate(pairs):
        grads = {}
        for side, answer, other in (("c", p.chosen, p.rejected), ("r", p.rejected, p.chosen)):
            row = enc.encode(p.prompt, answer, f"pair {i + 1}")
            ids = row.input_ids
            shared = token_masks(tok, ids[row.prompt_len:], answer, other)
            logp = token_logprobs(model, ids, row.prompt_len)
            n = len(logp)
            grads[side] = flat_grad(logp.sum() / n, params, retain=True)
            grads[side + "_shared"] = flat_grad((logp * shared).sum() / n, params)
            if side == "c":
                loss["shared"] += (-logp[shared]).tolist()
                loss["decisive"] += (-logp[~shared]).tolist()
        sums["chosen"] = sums["chosen"] + grads["c"]
        sums["chosen_shared"] = sums["chosen_shared"] + grads["c_shared"]
        sums["contrast"] = sums["contrast"] + grads["c"] - grads["r"]
        sums["contrast_shared"] = sums["contrast_shared"] + grads["c_shared"] - grads["r_shared"]
    return {"checkpoint": ckpt.name, "pairs": len(pairs),
            "loss_shared": statistics.mean(loss["shared"]), "loss_decisive": statistics.mean(loss["decisive"]),
            "shared_tokens": len(loss["shared"]) / len(pairs), "decisive_tokens": len(loss["decisive"]) / len(pairs),
            "shared_share_chosen": float(sums["chosen_shared"].norm() / sums["chosen"].norm()),
            "shared_share_contrast": float(sums["contrast_shared"].norm() / sums["contrast"].norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/evidence_anchor", help="a finished evidence run")
    parser.add_argument("--experiments", nargs="+", default=["repair_unsigned"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    torch.manual_seed(0)
    run = Path(args.run)
    results = {exp: {seed: measure(run / exp / f"seed-{seed}") for seed in args.seeds} for exp in args.experiments}
    keys = ["loss_shared", "loss_decisive", "shared_tokens", "decisive_tokens", "shared_share_chosen",
            "shared_share_contrast"]
    print("| experiment | seed | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for exp, seeds in results.items():
        for seed, m in seeds.items():
            print(f"| {exp} | {seed} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
    out = run / "anchor.json"
    old = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps(old | results, indent=2))


if __name__ == "__main__":
    main()
