"""Causal-LM benchmark (issue 4): LoRA on SmolLM2-135M lowers held-out perplexity on BBC News text.

    .venv/bin/python bench/bench_lm.py                          # as in RESULTS.md
    .venv/bin/python bench/bench_lm.py --steps 20 --limit 40    # quick look

SmolLM2-135M-Instruct comes from the bundled GGUF file (dequantised once, cached); the data are BBC
News articles as plain text (`bbc-news-text`, the same seeded split as `bbc-news`). Perplexity is
the token-mean exp(loss) over the held-out test articles, measured before training (base model,
delta disabled) and after, on the same tokens, so the two figures compare directly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128, help="tokens per article")
    ap.add_argument("--limit", type=int, default=240, help="articles per split")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import torch

    import deltatune as dt
    from deltatune.data import load_data
    from deltatune.models import load_model
    from deltatune.train import TrainConfig, evaluate, fit

    torch.manual_seed(0)
    entry = load_model("smollm2", max_length=args.max_length)
    train = load_data("bbc-news-text", "train", limit=args.limit)
    test = load_data("bbc-news-text", "test", limit=max(args.limit // 4, 1))
    dt.attach(entry.model, dt.LoRA(r=args.rank, alpha=2 * args.rank, targets=["q_proj", "v_proj"]))
    summary = dt.trainable_summary(entry.model)
    with dt.disabled(entry.model):
        before = evaluate(entry.model, test, entry.collate, task=entry.task, batch_size=8)
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, metric="loss",
                      eval_each_epoch=False, keep_best=False, progress=False)
    t0 = time.time()
    fit(entry.model, train, entry.collate, cfg, task=entry.task)
    seconds = time.time() - t0
    after = evaluate(entry.model, test, entry.collate, task=entry.task, batch_size=8)

    cmd = "`.venv/bin/python bench/bench_lm.py" + "".join(" " + a for a in sys.argv[1:]) + "`"
    body = (
        f"Command: {cmd} (SmolLM2-135M-Instruct from the bundled GGUF, LoRA r={args.rank} "
        f"alpha={2 * args.rank} on q_proj,v_proj, {args.steps} steps x batch {args.batch_size}, "
        f"{args.max_length} tokens per article, {len(train)} training articles, lr "
        f"{args.lr}, CPU).\n\n"
        "| held-out BBC News text | perplexity | token-mean loss | tokens |\n|---|---|---|---|\n"
        f"| base model | {before['perplexity']:.2f} | {before['loss']:.4f} | {before['tokens']} |\n"
        f"| + LoRA | {after['perplexity']:.2f} | {after['loss']:.4f} | {after['tokens']} |\n\n"
        f"Trainable: {summary.trainable:,} of {summary.total:,} parameters "
        f"({summary.percent:.3f}%); training took {seconds:.0f} s. Perplexity ratio after/before: "
        f"{after['perplexity'] / before['perplexity']:.3f}."
    )
    print(body)
    if not args.no_write:
        from _results import write_section

        write_section("Causal LM: LoRA on SmolLM2 lowers held-out perplexity (issue 4)", body)


if __name__ == "__main__":
    main()
