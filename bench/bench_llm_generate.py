"""Generation throughput with many adapters in one batch (issue 20): SmolLM2-135M, 8 LoRA adapters.

    .venv/bin/python bench/bench_llm_generate.py                       # 32 prompts, 32 new tokens
    .venv/bin/python bench/bench_llm_generate.py --new-tokens 16 --repeat 1   # quick look

Three ways to answer the same 32 prompts, 4 per adapter (LoRA r=8 on q_proj/v_proj, random
non-zero B so every adapter answers differently), with KV-cached greedy decoding of exactly
``--new-tokens`` tokens per prompt (EOS ignored, so every way writes the same number of tokens):

* routed: one batch of 32, row i on its prompt's adapter (``deltatune.route``);
* one adapter: the same batch of 32 on a single active adapter (the fastest case, no routing);
* in turn: each adapter's 4 prompts as their own batch, switching with ``dt.set_active``;
* one adapter, 4 prompts: one of those small batches alone. It bounds what routing can gain over
  "in turn": even free routing is at most 8 × t(4 prompts) / t(32 prompts) faster than taking the
  adapters in turn, so on hardware where a batch of 32 costs much more than a batch of 4 (a CPU,
  where decoding is compute-bound already at small batches) the aim of 4× is out of reach.

Tokens/s is generated tokens over wall time: the median of ``--repeat`` rounds after a warm-up
round, each round running every way once (in a rotated order, so a busy machine slows all alike).
The aim: routed ≥ 0.9 × one adapter and ≥ 4 × in turn. ``--hf`` adds transformers' own
``generate`` on the one-adapter batch for comparison with deltatune's decode loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.", "What is 12 times 7?",
    "Give a synonym for happy.", "Translate 'good morning' to Spanish.", "Who wrote Hamlet?",
    "What gas do plants absorb?", "How many legs does a spider have?",
    "Write a haiku about autumn leaves falling slowly.", "Explain what a prime number is.",
    "What is the boiling point of water in Celsius?", "Name a planet with rings.",
    "Summarise the plot of Cinderella in one sentence.", "What does CPU stand for?",
    "List two uses of copper.", "What is the opposite of ancient?",
]


def make_adapters(model, n: int, rank: int, seed: int = 0) -> list[str]:
    """``n`` LoRA adapters on q_proj/v_proj with random non-zero B (each answers differently)."""
    import torch

    import deltatune as dt

    names = [f"a{i}" for i in range(n)]
    for name in names:
        dt.attach(model, dt.LoRA(r=rank, alpha=2 * rank, targets=["q_proj", "v_proj"]), name=name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return names


def measure(ways: dict[str, Callable[[], int]], rounds: int) -> dict[str, tuple[float, int]]:
    """Median seconds of each way over ``rounds`` rounds, and the tokens one run writes. One
    warm-up round first; within a round the ways run one after another, in an order rotated each
    round, so load from other processes falls on all of them alike."""
    tokens = {label: fn() for label, fn in ways.items()}
    times: dict[str, list[float]] = {label: [] for label in ways}
    labels = list(ways)
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            t0 = time.perf_counter()
            ways[label]()
            times[label].append(time.perf_counter() - t0)
    return {label: (statistics.median(times[label]), tokens[label]) for label in ways}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--hf", action="store_true", help="also time transformers' generate")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    import deltatune as dt
    from deltatune.lm.generate import causal_lm, generate
    from deltatune.models import load_model

    torch.manual_seed(0)
    entry = load_model("smollm2")
    model = entry.model.to(args.device).eval()
    tokenizer = entry.collate.tokenizer
    names = make_adapters(causal_lm(model), args.adapters, args.rank)
    prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.prompts)]
    per = args.prompts // args.adapters
    routes = [names[i // per % len(names)] for i in range(args.prompts)]
    common = dict(max_new_tokens=args.new_tokens, ignore_eos=True, batch_size=args.prompts)

    def routed() -> int:
        out = generate(model, tokenizer, prompts, adapters=routes, **common)
        return sum(len(g.tokens) for g in out)

    def one_adapter() -> int:
        dt.set_active(model, names[0])
        out = generate(model, tokenizer, prompts, **common)
        return sum(len(g.tokens) for g in out)

    def in_turn() -> int:
        total = 0
        for name in names:
            dt.set_active(model, name)
            mine = [p for p, r in zip(prompts, routes) if r == name]
            total += sum(len(g.tokens) for g in generate(model, tokenizer, mine, **common))
        return total

    def one_small() -> int:
        dt.set_active(model, names[0])
        out = generate(model, tokenizer, prompts[:per], **common)
        return sum(len(g.tokens) for g in out)

    ways = {"routed (1 batch, 8 adapters)": routed, "one adapter (1 batch)": one_adapter,
            "in turn (8 batches, set_active)": in_turn,
            f"one adapter, {per} prompts (1 batch)": one_small}
    if args.hf:
        ways["one adapter, transformers generate"] = lambda: _hf_generate(
            model, tokenizer, prompts, names[0], args.new_tokens)
    rates = {}
    for label, (seconds, tokens) in measure(ways, args.repeat).items():
        rates[label] = tokens / seconds
        print(f"{label:<38} {tokens:>6} tokens  {seconds:7.3f} s  {rates[label]:9.1f} tokens/s",
              flush=True)
    r, one, turn, small = (rates[k] for k in list(ways)[:4])
    print(f"\nrouted / one adapter: {r / one:.3f}   (aim >= 0.9)")
    print(f"routed / in turn:     {r / turn:.3f}   (aim >= 4)")
    print(f"one adapter / in turn: {one / turn:.3f}   (the most routing can reach; batch "
          f"{args.prompts} writes {one / small:.2f}x the tokens/s of batch {per})")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {device}, torch threads {torch.get_num_threads()}")


def _hf_generate(model, tokenizer, prompts, name, new_tokens) -> int:
    import deltatune as dt
    from deltatune.lm.generate import causal_lm, encode, left_pad, prompt_text

    lm = causal_lm(model)
    dt.set_active(model, name)
    rows = [encode(tokenizer, prompt_text(tokenizer, p)) for p in prompts]
    ids, mask = left_pad(rows, tokenizer.pad_token_id, next(lm.parameters()).device)
    pad = tokenizer.pad_token_id
    out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return (out.shape[1] - ids.shape[1]) * len(prompts)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
