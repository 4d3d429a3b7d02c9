"""Benchmark gradient-feature extraction against a plain training step and a batch-size-1 loop.

Run: ``python tools/bench/bench_features.py`` (add ``--quick`` for a short CPU dry run).

For each workload it measures, side by side in one invocation, examples/s of
(a) one plain LoRA training step (forward + backward of the batch's mean loss),
(b) our extraction: exact per-example gradients + Adam preconditioning + projection + L2 norm,
(c) a batch-size-1 autograd loop (one backward per row, flattened gradients, same preconditioning
    and projection), and prints the ratios a/b and c/b. Peak memory is measured per case in a
fresh process (max RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU). Targets: b >= 0.7 a,
b >= 5 c on the larger workload.

``--grid`` explains why the ratio a/b differs between setups: on one model shape, batch and token
count it measures (a) and (b) for every combination of LoRA rank (16, 128), model dtype (float32,
bfloat16) and attention (eager, sdpa). Per-example work (the [B, out, in] gradients, Adam
preconditioning, projection, norms) grows with the LoRA parameter count and stays in fp32, while the
forward/backward it is compared with shrinks with bf16 and sdpa; so the ratio falls with a larger rank,
bf16 and sdpa. This is how the two GPU figures on record (0.67x from this script: r=128, bf16, sdpa;
0.98x from tools/bench/bench_peers on its 1B workload: r=16, fp32 with TF32, eager) are compared.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

DTYPE = torch.float32
WORKLOADS = {
    # name: (hidden, layers, heads, intermediate, vocab, seq, lora r, batch)
    "tiny": None,  # the embedded tiny model
    "llama-8x512": (512, 8, 8, 1376, 2048, 256, 16, 8),
    "llama-1b": (2048, 16, 32, 8192, 32000, 512, 128, 8),  # Llama-3.2-1B shape (MHA), paper's r=128; GPU
}


def build(workload: str, device: str, lora_r: int | None = None, attn: str | None = None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from prism_lightning import TINY_MODEL

    torch.manual_seed(0)
    if WORKLOADS[workload] is None:
        base, seq, r, batch = AutoModelForCausalLM.from_pretrained(TINY_MODEL), 32, 8, 32
        vocab = base.config.vocab_size
    else:
        hidden, layers, heads, inter, vocab, seq, r, batch = WORKLOADS[workload]
        with torch.device(device):  # random init on the GPU: seconds instead of a minute for 1B
            base = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                                num_key_value_heads=heads, intermediate_size=inter, vocab_size=vocab,
                                                max_position_embeddings=seq * 2,
                                                **({"attn_implementation": attn} if attn else {})))
    r = lora_r or r
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)  # peft zero-inits B, which would zero every A gradient
    model.to(device=device, dtype=DTYPE).eval()
    ids = torch.randint(3, vocab, (batch, seq), device=device)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    batch_d = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return model, batch_d


def run_case(workload: str, case: str, device: str, reps: int, proj_kind: str, dim: int, lora_r: int | None = None,
             attn: str | None = None) -> dict:
    from prism_lightning.config import ProjectionArgs
    from prism_lightning.influence.extract import gradient_features
    from prism_lightning.influence.objective import mean_logprob
    from prism_lightning.influence.per_example import lora_linears
    from prism_lightning.influence.preconditioners import Adam, adam_precondition
    from prism_lightning.influence.projection import Projector

    model, batch = build(workload, device, lora_r, attn)
    layers = lora_linears(model)
    moments = {n: (torch.randn(m.weight.shape, device=device) * 1e-3,
                   torch.rand(m.weight.shape, device=device) * 1e-6) for n, m in layers.items()}
    projector = Projector(ProjectionArgs(kind=proj_kind, dim=dim), {n: m.weight.numel() for n, m in layers.items()})
    pre = Adam.from_moments(moments, 0.9, 0.999, 1e-8)
    opt = torch.optim.AdamW([m.weight for m in layers.values()], lr=1e-4)
    rows = batch["input_ids"].shape[0]

    def train_step():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        (-mean_logprob(logits, batch["labels"])).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def extract():
        gradient_features(model, layers, batch, projector, pre, normalize=True)

    def loop():
        for i in range(rows):
            one = {k: v[i: i + 1] for k, v in batch.items()}
            logits = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits
            (-mean_logprob(logits, one["labels"])).sum().backward()
            out = projector.new_output(1, device)
            for name in sorted(layers):
                g = layers[name].weight.grad[None]
                m, v = moments[name]
                projector.add(out, name, adam_precondition(g, m, v, 0.9, 0.999, 1e-8).reshape(1, -1))
            model.zero_grad(set_to_none=True)
            out / out.norm()

    fn = {"train_step": train_step, "extract": extract, "bs1_loop": loop}[case]
    fn()  # warm-up (also fills projection caches)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"examples_per_s": rows * reps / secs, "peak_mb": peak / 2**20,
            "params": sum(p.numel() for p in model.parameters()),
            "lora_params": sum(m.weight.numel() for m in layers.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="tiny,llama-8x512")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--projection", default="sjlt")
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="model dtype (bfloat16 on GPU); features stay fp32")
    parser.add_argument("--quick", action="store_true", help="1 rep, tiny workload only (a dry run)")
    parser.add_argument("--grid", action="store_true", help="train_step and extract for LoRA r 16/128 x dtype "
                        "float32/bfloat16 x attention eager/sdpa on each workload (see the docstring)")
    parser.add_argument("--lora-r", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--attn", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DTYPE
    DTYPE = getattr(torch, args.dtype)
    if args.case:  # child process: one case, JSON on stdout
        print(json.dumps(run_case(args.workload, args.case, args.device, args.reps, args.projection, args.dim,
                                  args.lora_r, args.attn)))
        return
    if args.grid:
        return grid(args)
    if args.quick:
        args.workloads, args.reps = "tiny", 1
    print(f"device={args.device} dtype={args.dtype} projection={args.projection} k={args.dim} reps={args.reps} "
          f"threads={torch.get_num_threads()}")
    header = f"{'workload':<13}{'case':<12}{'examples/s':>12}{'peak MB':>10}{'vs extract':>12}"
    print(header)
    print("-" * len(header))
    summary = {}
    for workload in args.workloads.split(","):
        res = {}
        for case in ("train_step", "extract", "bs1_loop"):
            cmd = [sys.executable, __file__, "--case", case, "--workload", workload, "--reps", str(args.reps),
                   "--projection", args.projection, "--dim", str(args.dim), "--device", args.device,
                   "--dtype", args.dtype]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res[case] = json.loads(out.stdout.strip().splitlines()[-1])
        ext = res["extract"]["examples_per_s"]
        for case, r in res.items():
            print(f"{workload:<13}{case:<12}{r['examples_per_s']:>12.1f}{r['peak_mb']:>10.0f}"
                  f"{r['examples_per_s'] / ext:>11.2f}x")
        a_b = ext / res["train_step"]["examples_per_s"]
        b_c = ext / res["bs1_loop"]["examples_per_s"]
        summary[workload] = {"extract_vs_train_step": a_b, "extract_vs_bs1_loop": b_c}
        print(f"{workload}: extraction throughput = {a_b:.2f} x plain training step; "
              f"{b_c:.1f} x the batch-size-1 loop ({res['extract']['lora_params']:,} LoRA params)")
    print(json.dumps(summary))


def grid(args) -> None:
    """extract / train_step for each LoRA rank x dtype x attention on the same model, batch and tokens."""
    print(f"device={args.device} projection={args.projection} k={args.dim} reps={args.reps} "
          f"threads={torch.get_num_threads()}")
    header = f"{'workload':<13}{'r':>5}{'dtype':>10}{'attn':>7}{'train ex/s':>12}{'extract ex/s':>14}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    table = []
    for workload in args.workloads.split(","):
        for r in (16, 128):
            for dtype in ("float32", "bfloat16"):
                for attn in ("eager", "sdpa"):
                    res = {}
                    for case in ("train_step", "extract"):
                        cmd = [sys.executable, __file__, "--case", case, "--workload", workload, "--reps",
                               str(args.reps), "--projection", args.projection, "--dim", str(args.dim), "--device",
                               args.device, "--dtype", dtype, "--lora-r", str(r), "--attn", attn]
                        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                        res[case] = json.loads(out.stdout.strip().splitlines()[-1])["examples_per_s"]
                    ratio = res["extract"] / res["train_step"]
                    table.append({"workload": workload, "r": r, "dtype": dtype, "attn": attn, **res, "ratio": ratio})
                    print(f"{workload:<13}{r:>5}{dtype:>10}{attn:>7}{res['train_step']:>12.1f}{res['extract']:>14.1f}"
                          f"{ratio:>7.2f}x", flush=True)
    print(json.dumps(table))


if __name__ == "__main__":
    main()
