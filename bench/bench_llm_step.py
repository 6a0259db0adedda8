"""One LoRA training step of SmolLM2-135M: chunked LM loss against whole-batch logits (issue 20).

    .venv/bin/python bench/bench_llm_step.py                      # batch 8 x 256, 2 timed steps
    .venv/bin/python bench/bench_llm_step.py --eval               # + one no-grad batch of 64
    .venv/bin/python bench/bench_llm_step.py --batch 16 --steps 1 # the old CLI default batch

Each way runs in its own process (so ``ru_maxrss`` is its own peak): SmolLM2 from
``load_model("smollm2")`` in float32, LoRA r=8 on q_proj/v_proj, a batch of random tokens with
every position labelled, AdamW; one untimed warm-up step, then ``--steps`` timed optimizer steps
(forward, loss, backward, clip, step):

* chunked: ``deltatune.lm.objectives.sft`` — hidden states, then the projection and cross-entropy
  ``--chunk`` labelled positions at a time, each chunk's logits recomputed in backward;
* full: the model's whole (B, T, 49152) float32 logits and ``train.losses.compute_loss`` (what the
  trainer did before the chunked loss).

Variants of the chunked way (``--modes``): ``+malloc`` fixes glibc's mmap threshold first
(``deltatune.train.memory.steady_malloc`` at ``--mmap-threshold`` bytes, 1 MiB by default),
``+ckpt`` trains with gradient checkpointing (``--gradient-checkpointing``).

``--eval`` adds the evaluation of one batch of ``--eval-batch`` (default 64, the trainer's eval
batch) under no_grad, chunked against whole-batch logits. Reported: median wall seconds per step,
CPU seconds per step (user + system of the process: less sensitive than wall time to other work
on a shared machine), the RSS once the model, delta and optimizer are loaded, and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("chunked", "full", "chunked+malloc", "chunked+ckpt", "chunked+ckpt+malloc")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(mode: str, batch: int, length: int, steps: int, chunk: int, threads: int,
            evaluate: bool = False, mmap_threshold: int = 1 << 20) -> dict:
    """One way in this process: seconds per step and memory (see the module docstring)."""
    import torch

    import deltatune as dt
    from deltatune.lm.objectives import sft
    from deltatune.models import load_model
    from deltatune.train.losses import compute_loss, eval_sums

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if "+malloc" in mode:
        from deltatune.train.memory import steady_malloc

        steady_malloc(mmap_threshold)
    entry = load_model("smollm2")
    model = entry.model
    dt.attach(model, dt.LoRA(r=8, alpha=16, targets=["q_proj", "v_proj"]), name="default")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.lm.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    model.train()
    loaded = _rss_mb()  # the model, its delta and the optimizer, before any step

    if "+ckpt" in mode:
        from deltatune.train.memory import gradient_checkpointing

        keep = gradient_checkpointing(model)  # on for the rest of this process: the context
        keep.__enter__()  # manager is kept alive (collected, it would switch checkpointing off)

    def step() -> None:
        if mode.startswith("chunked"):
            loss = sft(model, data, chunk_size=chunk).loss
        else:
            logits = model(ids, data["attention_mask"])
            loss = compute_loss(logits, ids, "causal-lm")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if evaluate:  # one no-grad batch, as the trainer's evaluation
        eval_ids = torch.randint(0, vocab, (64, length), generator=torch.Generator().manual_seed(1))
        eval_batch = {"input_ids": eval_ids, "attention_mask": torch.ones_like(eval_ids),
                      "labels": eval_ids}
        model.eval()
        cpu, tick = _cpu_s(), time.perf_counter()
        with torch.no_grad():
            if mode.startswith("chunked"):
                from deltatune.lm.objectives import make_objective

                make_objective("sft", chunk_size=chunk).sums(model, eval_batch)
            else:
                eval_sums(model(eval_ids), eval_ids, "causal-lm")
        return {"mode": f"eval-{mode}", "batch": len(eval_ids), "length": length,
                "seconds": time.perf_counter() - tick, "cpu_seconds": _cpu_s() - cpu,
                "rss_loaded_mb": loaded, "peak_rss_mb": _rss_mb()}
    step()  # warm-up: allocator, optimizer state
    walls, cpus = [], []
    for _ in range(steps):
        cpu, tick = _cpu_s(), time.perf_counter()
        step()
        walls.append(time.perf_counter() - tick)
        cpus.append(_cpu_s() - cpu)
    if "+malloc" in mode:
        mode = f"{mode} {mmap_threshold >> 20} MiB"
    return {"mode": mode, "batch": batch, "length": length, "seconds": statistics.median(walls),
            "cpu_seconds": statistics.median(cpus), "rss_loaded_mb": loaded,
            "peak_rss_mb": _rss_mb()}


def run_child(mode: str, args: argparse.Namespace, evaluate: bool = False) -> dict:
    """``measure`` in a fresh process (its own peak RSS); the child prints one JSON line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode,
           "--batch", str(args.batch), "--length", str(args.length), "--steps", str(args.steps),
           "--chunk", str(args.chunk), "--threads", str(args.threads),
           "--mmap-threshold", str(args.mmap_threshold)]
    if evaluate:
        cmd.append("--eval")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [f"{'way':<20} {'batch':>5} {'tokens':>6} {'wall s':>8} {'CPU s':>8} "
             f"{'loaded RSS MB':>13} {'peak RSS MB':>11}"]
    for r in rows:
        lines.append(f"{r['mode']:<20} {r['batch']:>5} {r['length']:>6} {r['seconds']:>8.2f} "
                     f"{r['cpu_seconds']:>8.2f} {r['rss_loaded_mb']:>13.0f} "
                     f"{r['peak_rss_mb']:>11.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps")
    parser.add_argument("--chunk", type=int, default=256, help="positions per loss chunk")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--mmap-threshold", type=int, default=1 << 20,
                        help="bytes: glibc's fixed mmap threshold in the +malloc modes")
    parser.add_argument("--eval", action="store_true", help="also one no-grad eval batch of 64")
    parser.add_argument("--modes", default="chunked,full", help=f"of {','.join(MODES)}")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.child:
        row = measure(args.child, args.batch, args.length, args.steps, args.chunk, args.threads,
                      evaluate=args.eval, mmap_threshold=args.mmap_threshold)
        print(json.dumps(row))
        return 0
    rows = []
    for mode in args.modes.split(","):
        rows.append(run_child(mode, args))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    if args.eval:
        for mode in args.modes.split(","):
            rows.append(run_child(mode, args, evaluate=True))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
