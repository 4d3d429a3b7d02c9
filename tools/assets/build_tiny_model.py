"""Build and pretrain the embedded tiny Llama under ``prism_lightning/assets/tiny-llama``.

Run: ``python tools/assets/build_tiny_model.py`` (seeded; bit-identical on rebuild on one machine; 3.5
minutes on a 2-core CPU). Then ``python tools/assets/measure_tiny_model.py`` writes the per-skill accuracy,
behaviours and the demo's preconditions into the model card.

The tokenizer is a byte-level BPE (covers every byte, so all printable ASCII) trained with
``tokenizers`` on the pretraining text, with digits split one per token so that arithmetic stays
learnable. The model is a 4-layer Llama pretrained from scratch on rows of the demo skills that are
in no committed data file (``tools/assets/build_demo_data.py``), with the loss on completion tokens only.
Its pretraining mix leaves it ambivalent about two behaviours (agreeing with close wrong claims,
copying words it is asked to write backwards); see ``build_demo_data.pretrain_rows``.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_demo_data import pretrain_rows  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "prism_lightning" / "assets" / "tiny-llama"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
)


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with single-digit tokens and <pad>/<s>/</s> specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", padding_side="right")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode(tokenizer, rows: list[dict]) -> list[tuple[list[int], int]]:
    """(ids, prompt_length) per row; completion followed by EOS."""
    out = []
    for r in rows:
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        out.append((p + c + [tokenizer.eos_token_id], len(p)))
    return out


def batches(encoded, batch_size: int, pad_id: int, rng: random.Random):
    """Endless shuffled batches with labels masked to completion tokens."""
    order = list(range(len(encoded)))
    while True:
        rng.shuffle(order)
        for s in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [encoded[i] for i in order[s: s + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((batch_size, width), pad_id)
            labels = torch.full((batch_size, width), -100)
            mask = torch.zeros((batch_size, width), dtype=torch.long)
            for b, (seq, plen) in enumerate(chunk):
                ids[b, : len(seq)] = torch.tensor(seq)
                labels[b, plen: len(seq)] = torch.tensor(seq[plen:])
                mask[b, : len(seq)] = 1
            yield ids, labels, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    rows = pretrain_rows()
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in rows], vocab_size=384)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, rope_theta=10000.0)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}, {len(rows)} pretraining rows")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    data = batches(encode(tokenizer, rows), args.batch_size, tokenizer.pad_token_id, rng)
    model.train()
    start = time.time()
    for step in range(args.steps):
        ids, labels, mask = next(data)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {loss.item():.4f} {time.time() - start:6.0f}s", flush=True)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(f"saved to {args.out} after {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
