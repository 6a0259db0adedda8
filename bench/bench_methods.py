"""Method-zoo benchmark (issue 5): every method on tweet-sentiment (MiniLM) and the conv-capable ones on
MNIST (EfficientNet-Lite0), against the frozen backbone + linear probe.

    .venv/bin/python bench/bench_methods.py                              # as in RESULTS.md
    .venv/bin/python bench/bench_methods.py --seeds 0 --only lora ia3    # a few rows
    .venv/bin/python bench/bench_methods.py --part text --train-limit 8000 --eval-limit 3000   # larger

Every method trains through deltatune's trainer with the same split, the same number of optimizer steps
(one epoch over the training subset) and batch size; only the learning rate is per method (the values
the methods' papers and peft's examples use). The classification head trains beside every delta.
Each (data, method, seed) runs in its own process, so the peak RSS is that run's own; rows are
appended to a cache file, and a rerun skips the rows it already has (delete the file to start over).
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
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
CACHE = ROOT / ".cache" / "bench_methods" / "rows.jsonl"

#: method → (spec options, learning rate); "probe" trains the head alone
TEXT = {
    "probe": ({}, 5e-3),
    "lora": (
        {"r": 8, "alpha": 16},
        3e-3,
    ),  # picked on tweet-sentiment validation in bench_accuracy.py
    "ia3": ({}, 5e-3),
    "ssf": ({}, 5e-3),
    "bitfit": ({}, 5e-3),
    "ln_tuning": ({}, 5e-3),
    "vera": ({"r": 256}, 5e-3),
    "oft": ({}, 1e-3),
    "boft": ({"butterfly_factor": 2}, 5e-3),  # 1e-3: 60.3% validation accuracy, 5e-3: 71.3%
    "sparse": (
        {"density": 0.005},
        1e-2,
    ),  # 1e-3: 60.7% validation accuracy, 1e-2: 71.0% (probe 66.2%)
    "bottleneck": ({"style": "houlsby", "reduction_factor": 16}, 1e-3),
    "bottleneck-pfeiffer": (
        {"style": "pfeiffer", "reduction_factor": 16},
        3e-3,
    ),  # 1e-3: 63.2%, 3e-3: 70.8%
    "bottleneck-parallel": ({"style": "parallel", "reduction_factor": 16, "scaling": 4.0}, 1e-3),
    "compacter": ({}, 3e-3),
    "prompt": ({"num_virtual_tokens": 10}, 3e-2),
    "prefix": ({"num_virtual_tokens": 10}, 5e-3),
    "side": ({}, 1e-3),
    # MAM's members at the sizes of the prefix and parallel-adapter rows (the preset's 30 tokens and reduction 2
    # are the paper's for 1024-wide models): validation accuracy 30 tok / r 2 at 1e-3 62.7%, 3e-4 64.0%;
    # 10 tok / r 16 at 1e-3 64.2%, 3e-3 68.2%, 5e-3 68.8% (probe 66.2%)
    "mam": ({"num_virtual_tokens": 10, "reduction_factor": 16}, 5e-3),
    "unipelt": ({}, 1e-3),
}
#: conv-capable methods on EfficientNet-Lite0 (its expand/project 1x1 convolutions by default)
IMAGE = {
    "probe": ({}, 5e-3),
    "lora": ({"r": 8, "alpha": 16, "targets": ("_expand_conv", "_project_conv")}, 1e-3),
    "ssf": ({}, 5e-3),
    "bitfit": ({}, 5e-3),
    "ia3": ({"targets": ("_expand_conv", "_project_conv"), "feedforward": ()}, 5e-3),
    "sparse": (
        {"density": 0.005},
        1e-2,
    ),  # 1e-3: 80.0% validation accuracy, 1e-2: 87.8% (probe 79.7%)
    "bottleneck": (
        {"style": "pfeiffer", "reduction_factor": 4, "targets": ("_project_conv",)},
        1e-3,
    ),
}
PARTS = {
    "text": ("tweet-sentiment", "minilm", TEXT, 16),
    "image": ("mnist", "efficientnet-lite0", IMAGE, 32),
}
#: learning rates that rows cached before the rate was recorded ran with (picked since on validation, seed 0)
_OLD_LR = {("text", "sparse"): 1e-3, ("text", "bottleneck-pfeiffer"): 1e-3, ("text", "boft"): 1e-3,
           ("image", "sparse"): 1e-3, ("text", "mam"): 1e-3}


def lr_of_row(r: dict) -> float:
    return r.get("lr", _OLD_LR.get((r["part"], r["method"]), PARTS[r["part"]][2][r["method"]][1]))


def options_of_row(r: dict) -> str:
    """The spec options a row ran with, as canonical JSON (rows cached before they were recorded: today's;
    the one method whose options changed since, MAM, changed its learning rate too)."""
    return json.dumps(r.get("options", PARTS[r["part"]][2][r["method"]][0]), sort_keys=True)


class StepTimer:
    """Trainer callback: wall time between consecutive optimizer steps (the first step is warm-up)."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.times: list[float] = []

    def on_train_start(self, model) -> None:
        self.last = None

    def on_step_end(self, model, step: int) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now

    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


def run_one(
    part: str, method: str, seed: int, train_limit: int, eval_limit: int, max_length: int = 128
) -> dict:
    """Train one delta in this process and return its row (called in a child process)."""
    import torch

    import deltatune as dt
    from deltatune.cli.spec_options import build_spec
    from deltatune.data import load_data
    from deltatune.models import load_model
    from deltatune.train import TrainConfig, evaluate, fit

    data, model_name, table, batch = PARTS[part]
    options, lr = table[method]
    torch.manual_seed(seed)
    train = load_data(data, "train", seed=0, limit=train_limit)
    test = load_data(data, "test", seed=0, limit=eval_limit)
    opts = {"max_length": max_length} if part == "text" else {}
    entry = load_model(model_name, num_labels=len(train.label_names), **opts)
    model = entry.model
    head = "classifier" if part == "text" else "net._fc"
    if method == "probe":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(head))
    else:
        base = method.split("-")[0]
        dt.attach(model, build_spec(base, dict(options), head=[head]))
    summary = dt.trainable_summary(model)
    timer = StepTimer()
    cfg = TrainConfig(
        epochs=1,
        batch_size=batch,
        lr=lr,
        seed=seed,
        progress=False,
        eval_each_epoch=False,
        keep_best=False,
    )
    t0 = time.time()
    fit(model, train, entry.collate, cfg, task=entry.task, callbacks=[timer])
    seconds = time.time() - t0
    metrics = evaluate(model, test, entry.collate, task=entry.task)
    return {
        "part": part,
        "method": method,
        "seed": seed,
        "train_limit": train_limit,
        "eval_limit": eval_limit,
        "max_length": max_length,
        "lr": lr,
        "options": json.loads(json.dumps(options)),
        "accuracy": metrics["accuracy"],
        "trainable": summary.trainable,
        "total": summary.total,
        "trainable_percent": summary.percent,
        "step_s": timer.median(),
        "train_s": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def _cached() -> list[dict]:
    if not CACHE.exists():
        return []
    return [json.loads(line) for line in CACHE.read_text().splitlines() if line.strip()]


def _table(part: str, rows: list[dict]) -> tuple[list[str], list[str]]:
    """The part's table; each method is compared with the probe on the seeds both have (paired)."""
    methods = [m for m in PARTS[part][2] if any(r["method"] == m for r in rows)]
    probe = {r["seed"]: r["accuracy"] * 100 for r in rows if r["method"] == "probe"}
    lines = [
        (
            "| method | test accuracy % (mean ± std) | vs probe (pt, same seeds) | trainable | trainable % | "
            "peak RSS (MiB) | step (s) | seeds | beats probe |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    losers = []
    for m in methods:
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["seed"])
        accs = [r["accuracy"] * 100 for r in mine]
        mean, std = statistics.mean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0)
        paired = [r["accuracy"] * 100 - probe[r["seed"]] for r in mine if r["seed"] in probe]
        gap = statistics.mean(paired) if paired else None
        beats = "—" if m == "probe" or gap is None else ("yes" if gap > 0 else "**no**")
        if beats == "**no**":
            losers.append(m)
        lines.append(
            f"| {m} | {mean:.2f} ± {std:.2f} | {'—' if m == 'probe' or gap is None else f'{gap:+.2f}'} | "
            f"{mine[0]['trainable']:,} | {mine[0]['trainable_percent']:.3f} | "
            f"{statistics.median(r['peak_rss_mb'] for r in mine):.0f} | "
            f"{min(r['step_s'] for r in mine):.3f} | {len(mine)} | {beats} |"
        )
    return lines, losers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", nargs="+", choices=list(PARTS), default=list(PARTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", help="methods to run (default: all of the part)")
    ap.add_argument("--train-limit", type=int, default=3000, help="training examples (one epoch)")
    ap.add_argument("--eval-limit", type=int, default=1500, help="test examples")
    ap.add_argument("--max-length", type=int, default=128, help="MiniLM tokens (text part)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each in its own process)")
    ap.add_argument(
        "--cached-only",
        action="store_true",
        help="render the table from the cached rows only (list the missing ones instead of running them)",
    )
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        part, method, seed = args.child
        print(
            json.dumps(
                run_one(part, method, int(seed), args.train_limit, args.eval_limit, args.max_length)
            )
        )
        return
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    key = lambda r: (
        r["part"],
        r["method"],
        r["seed"],
        r["train_limit"],
        r["eval_limit"],
        r.get("max_length", 128),  # noqa: E731
        lr_of_row(r),
        options_of_row(r),
    )
    done = {key(r): r for r in _cached()}
    rows: dict[str, list[dict]] = {p: [] for p in args.part}
    wanted = [
        (
            part,
            method,
            seed,
            args.train_limit,
            args.eval_limit,
            args.max_length,
            PARTS[part][2][method][1],
            json.dumps(PARTS[part][2][method][0], sort_keys=True),
        )
        for part in args.part
        for seed in args.seeds
        for method in (args.only or PARTS[part][2])
        if method in PARTS[part][2]
    ]

    def child(k: tuple) -> subprocess.CompletedProcess:
        part, method, seed = k[:3]
        cmd = [
            sys.executable,
            __file__,
            "--child",
            part,
            method,
            str(seed),
            "--train-limit",
            str(args.train_limit),
            "--eval-limit",
            str(args.eval_limit),
            "--max-length",
            str(args.max_length),
        ]
        return subprocess.run(cmd, capture_output=True, text=True, check=False)

    with ThreadPoolExecutor(
        max_workers=args.jobs
    ) as pool:  # each run is its own process; threads only wait
        missing = [k for k in wanted if k not in done]
        if args.cached_only:
            if missing:
                print(
                    "not run (--cached-only): "
                    + ", ".join(f"{k[0]} {k[1]} seed {k[2]}" for k in missing),
                    flush=True,
                )
            missing = []
        running = {pool.submit(child, k): k for k in missing}
        for future in as_completed(running):
            k, proc = running[future], future.result()
            if proc.returncode != 0:
                print(f"{k[0]} {k[1]} seed {k[2]} FAILED:\n{proc.stderr[-3000:]}", flush=True)
                continue
            done[k] = json.loads(proc.stdout.strip().splitlines()[-1])
            with CACHE.open("a") as fh:
                fh.write(json.dumps(done[k]) + "\n")
            print(json.dumps(done[k]), flush=True)
    for k in wanted:
        if k in done:
            rows[k[0]].append(done[k])
    shown = "".join(" " + a for a in sys.argv[1:] if a not in ("--cached-only", "--no-write"))
    body = [f"Command: `.venv/bin/python bench/bench_methods.py{shown}`"]
    body.append(
        f"(one epoch over {args.train_limit} training examples of the seed-0 split, batch 16 text at {args.max_length} tokens / 32 images, "
        f"{args.eval_limit} test examples; seeds {', '.join(map(str, args.seeds))} change the initialisation and "
        "data order; "
        f"{'/'.join(sorted({str(r.get('threads', '?')) for p in rows.values() for r in p}))} CPU thread(s) per run at low "
        "priority on the shared machine beside other benchmarks, so step times (the median step of the least "
        "loaded run) are indicative only). Learning rates: "
        + "; ".join(
            f"{p}: " + ", ".join(f"{m} {lr:g}" for m, (_, lr) in PARTS[p][2].items())
            for p in args.part
        )
        + ". "
        "Spec options (the others at their defaults): "
        + "; ".join(
            f"{p}: " + ", ".join(f"{m} {json.dumps(o)}" for m, (o, _) in PARTS[p][2].items() if o)
            for p in args.part
        )
        + "."
    )
    for part in args.part:
        if not rows[part]:
            continue
        data, model_name, _, _ = PARTS[part]
        lines, losers = _table(part, rows[part])
        body.append(f"\n**{data}, {model_name}**\n\n" + "\n".join(lines))
        body.append("\nEvery method beats the linear probe." if not losers else
                    f"\nBelow the linear probe: {', '.join(losers)}.")
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        from _results import write_section

        write_section("Method zoo: every method vs the linear probe (issue 5)", text)


if __name__ == "__main__":
    main()
