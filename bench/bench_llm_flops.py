"""How fast the issue-20 command could be on this CPU at all: FLOPs per training example of
SmolLM2-135M against the machine's measured float32 matmul throughput (issue 20).

    .venv/bin/python bench/bench_llm_flops.py                 # 2 torch threads, 5 s per shape
    .venv/bin/python bench/bench_llm_flops.py --old-wall 5.25  # the issue's s / training example

The FLOPs are counted from the model's own config (``load_model("smollm2")``): every matmul of a
decoder block (q, k, v, o, gate, up, down), the attention products (causal: the mean context is
(T + 1) / 2) and the tied output projection, 2 FLOPs per multiply-add. A LoRA step on a frozen base
runs the forward (F), the backward through the activations only (no weight gradients for frozen
weights: about F again) and, with gradient checkpointing, each block's forward once more (F less
the output projection); an evaluation example is one forward. LoRA's own matmuls (r=8) and the
elementwise work are left out, so these are lower bounds.

The throughput is the median over ``--seconds`` of repeated ``torch.mm`` on the model's three
largest shapes (the MLP's two at batch x length rows, and a 256-position loss chunk against the
vocabulary), float32, ``--threads`` threads: the best this CPU does on the work that dominates.
The floor per training example of ``deltatune train --model smollm2 --data bbc-news-text
--max-steps 20 --limit 200`` is then (train FLOPs x 160 examples + eval FLOPs x 400 evaluated
examples) / 160 / throughput.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def model_flops(config, tokens: int) -> dict[str, float]:
    """Forward FLOPs of one sequence of ``tokens`` tokens, split into blocks and output head."""
    h, i = config.hidden_size, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = h // heads
    per_token_block = 2 * (h * h + 2 * h * kv * d + h * h + 3 * h * i)  # q, k, v, o, gate, up, down
    attention = 2 * 2 * heads * d * (tokens + 1) / 2  # scores and weighted sum, causal mean context
    blocks = config.num_hidden_layers * (per_token_block + attention) * tokens
    head = 2 * h * config.vocab_size * tokens
    return {"blocks": blocks, "head": head, "forward": blocks + head}


def matmul_gflops(shapes: list[tuple[int, int, int]], seconds: float) -> dict[str, float]:
    """Measured GFLOP/s of ``torch.mm`` (m x k) @ (k x n) per shape: median over repeats."""
    out = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            torch.mm(a, b)
        rates, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            torch.mm(a, b)
            rates.append(2 * m * k * n / (time.perf_counter() - t0) / 1e9)
        out[f"{m}x{k}@{k}x{n}"] = statistics.median(rates)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0, help="timing per matmul shape")
    p.add_argument("--length", type=int, default=256, help="tokens per training example")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-examples", type=int, default=160, help="the command's 20 x 8")
    p.add_argument("--eval-examples", type=int, default=400, help="its val + test, 200 each")
    p.add_argument("--old-wall", type=float, default=5.25,
                   help="the issue's wall seconds per training example (28 min / 320)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "src"))
    from deltatune.models import load_model

    config = load_model("smollm2").model.lm.config
    f = model_flops(config, args.length)
    train = 2 * f["forward"] + f["blocks"]  # forward, backward through activations, recompute
    tokens = args.batch * args.length
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    # the MLP's two shapes at the batch's rows, and one loss chunk of 256 positions x the vocabulary
    rates = matmul_gflops([(tokens, h, i), (tokens, i, h), (256, h, v)], args.seconds)
    best = max(rates.values())
    per_example = (train * args.train_examples + f["forward"] * args.eval_examples) / (
        args.train_examples)
    floor = per_example / (best * 1e9)
    row = {"threads": args.threads, "length": args.length,
           "forward_gflop_per_example": f["forward"] / 1e9,
           "train_gflop_per_example": train / 1e9,
           "command_gflop_per_train_example": per_example / 1e9,
           "matmul_gflops": rates, "best_gflops": best,
           "floor_s_per_train_example": floor,
           "aim_s_per_train_example": args.old_wall / 10,
           "needed_gflops_for_aim": per_example / (args.old_wall / 10) / 1e9}
    print(json.dumps(row, indent=1))
    print(f"\nfloor {floor:.2f} s per training example at {best:.0f} GFLOP/s; the 10x aim needs "
          f"{args.old_wall / 10:.3f} s, i.e. {row['needed_gflops_for_aim']:.0f} GFLOP/s")
    if args.json:
        args.json.write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
