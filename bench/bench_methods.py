"""Method-zoo benchmark (issue 5): every method on tweet-sentiment (MiniLM) and the conv-capable
ones on MNIST (EfficientNet-Lite0), against the frozen backbone + linear probe (and LoRA r=8).

    .venv/bin/python bench/bench_methods.py                              # as in RESULTS.md
    .venv/bin/python bench/bench_methods.py --seeds 0 --only lora ia3    # a few rows
    .venv/bin/python bench/bench_methods.py --part text --train-limit 8000 --eval-limit 3000  # more

Every method trains through deltatune's trainer with the same split, the same number of optimizer
steps (one epoch over the training subset) and batch size; only the learning rate is per method (the
values the methods' papers and peft's examples use, or picked on the validation split with
--select-lr where the comment beside the row gives the validation accuracies). The classification
head trains beside every delta. Each (data, method, seed) runs in its own process with --threads
torch threads (1 by default), so the peak RSS is that run's own; rows are appended to a cache file,
and a rerun skips the rows it already has (delete the file to start over).

    # learning-rate pick for a few methods: seed 0 at each rate, accuracy on the validation split
    .venv/bin/python bench/bench_methods.py --train-limit 1500 --eval-limit 600 --max-length 64 \
        --select-lr loha lokr --lrs 1e-3 3e-3 1e-2 [--opt r=4]

The weight-delta methods of issue 19 run with their defaults on MiniLM's attention query/value,
except where a size option is needed for a shape that fits (VBLoRA's vector_length and C3A's
block_size must divide 384) or for a parameter count near LoRA r=8's 73,728 (the defaults of MiSS,
SHiRA, GraLoRA and HiRA hold 4x as many; they run at 73,728, GraLoRA with LoRA's alpha/r = 2).
TrainableTokens is left out: it trains new rows of an embedding for new tokens, which a classifier
over a fixed vocabulary has no use for.
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
from _results import StepTimer  # noqa: E402

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
    # MAM's members at the sizes of the prefix and parallel-adapter rows (the preset's 30 tokens and
    # reduction 2 are the paper's for 1024-wide models): validation accuracy 30 tok / r 2 at 1e-3
    # 62.7%, 3e-4 64.0%;
    # 10 tok / r 16 at 1e-3 64.2%, 3e-3 68.2%, 5e-3 68.8% (probe 66.2%)
    "mam": ({"num_virtual_tokens": 10, "reduction_factor": 16}, 5e-3),
    "unipelt": ({}, 1e-3),
    # issue 19's weight-delta methods; lr picked with --select-lr (validation accuracy, seed 0)
    # LoHa at peft's r=8 (two rank-8 pairs, 2x LoRA r=8's parameters; their product has rank 64):
    # 1e-3 60.2%, 3e-3 66.0%, 1e-2 72.3%, 3e-2 74.2%, 1e-1 38.3% (probe 66.2%)
    "loha": ({}, 3e-2),
    "lokr": ({}, 3e-2),  # 1e-3 60.3%, 3e-3 66.2%, 1e-2 70.2%, 3e-2 70.7%, 1e-1 43.3%
    "fourierft": ({}, 1e-1),  # 3e-3 63.8%, 1e-2 67.5%, 3e-2 70.3%, 1e-1 71.5%, 3e-1 70.3%
    "hra": ({}, 3e-2),  # 3e-3 66.8%, 1e-2 71.0%, 3e-2 73.3%, 1e-1 70.3%
    "miss": ({"r": 16}, 3e-3),  # 1e-3 67.8%, 3e-3 70.7%, 1e-2 57.2%, 3e-2 38.3%
    "delora": ({}, 1e-3),  # 3e-4 70.0%, 1e-3 70.8%, 3e-3 70.7%, 1e-2 68.7%, 3e-2 64.3%
    "shira": ({"r": 8}, 3e-2),  # 3e-3 68.5%, 1e-2 71.8%, 3e-2 72.8%, 1e-1 60.5%
    "vblora": ({"vector_length": 192}, 1e-2),  # 3e-3 68.2%, 1e-2 70.8%, 3e-2 69.8%
    # RoAd: its default (road_1 on query/value, 4,608 angles and scales) ended at the probe on test
    # (68.22 vs 68.28); validation: road_1 q/v 3e-3 64.7%, 1e-2 68.7%, 3e-2 70.0%, 1e-1 70.2%,
    # 3e-1 53.0%; road_4 q/v 1e-2 70.3%, 3e-2 71.8%, 1e-1 71.0%, 3e-1 55.0%; road_4 on every
    # Linear (query/key/value/dense) 3e-3 69.2%, 1e-2 71.7%, 3e-2 72.7%, 1e-1 43.2%, 3e-1 43.2%
    "road": ({"variant": "road_4", "targets": ["query", "key", "value", "dense"]}, 3e-2),
    "gralora": ({"r": 8, "alpha": 16}, 1e-2),  # 3e-3 70.0%, 1e-2 70.8%, 3e-2 43.2%
    "hira": ({"r": 8}, 3e-2),  # 3e-3 64.7%, 1e-2 68.5%, 3e-2 70.8%, 1e-1 69.7%
    "waveft": ({}, 3e-3),  # 1e-3 71.8%, 3e-3 72.2%, 1e-2 58.3%, 3e-2 38.3%
    "c3a": ({"block_size": 192}, 3e-2),  # 3e-3 64.7%, 1e-2 66.8%, 3e-2 69.5%, 1e-1 67.5%
    "randlora": ({}, 1e-3),  # 3e-4 63.2%, 1e-3 71.8%, 3e-3 64.3%, 1e-2 43.2%, 3e-2 43.2%
}
#: the weight-delta methods that issue 19 added (TrainableTokens left out: see the module docstring)
ISSUE19 = ("loha", "lokr", "fourierft", "hra", "miss", "delora", "shira", "vblora", "road",
           "gralora", "hira", "waveft", "c3a", "randlora")
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
#: learning rates that rows cached before the rate was recorded ran with (picked since on
#: validation, seed 0)
_OLD_LR = {
    ("text", "sparse"): 1e-3,
    ("text", "bottleneck-pfeiffer"): 1e-3,
    ("text", "boft"): 1e-3,
    ("image", "sparse"): 1e-3,
    ("text", "mam"): 1e-3,
}


def lr_of_row(r: dict) -> float:
    return r.get("lr", _OLD_LR.get((r["part"], r["method"]), PARTS[r["part"]][2][r["method"]][1]))


def options_of_row(r: dict) -> str:
    """The spec options a row ran with, as canonical JSON (rows cached before they were recorded:
    today's;
    the one method whose options changed since, MAM, changed its learning rate too)."""
    return json.dumps(r.get("options", PARTS[r["part"]][2][r["method"]][0]), sort_keys=True)


def run_one(
    part: str,
    method: str,
    seed: int,
    train_limit: int,
    eval_limit: int,
    max_length: int = 128,
    *,
    lr: float | None = None,
    options: dict | None = None,
    validation: bool = False,
    threads: int = 1,
) -> dict:
    """Train one delta in this process and return its row (called in a child process). ``lr`` and
    ``options`` default to the table's; ``validation`` evaluates on the validation split (the
    learning-rate pick) instead of the test split."""
    import torch

    torch.set_num_threads(threads)

    import deltatune as dt
    from deltatune.cli.spec_options import build_spec
    from deltatune.data import load_data
    from deltatune.models import load_model
    from deltatune.train import TrainConfig, evaluate, fit

    data, model_name, table, batch = PARTS[part]
    options = table[method][0] if options is None else options
    lr = table[method][1] if lr is None else lr
    torch.manual_seed(seed)
    train = load_data(data, "train", seed=0, limit=train_limit)
    test = load_data(data, "val" if validation else "test", seed=0, limit=eval_limit)
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
    row = {
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
    if validation:
        row["validation"] = True
    return row


def _cached() -> list[dict]:
    if not CACHE.exists():
        return []
    return [json.loads(line) for line in CACHE.read_text().splitlines() if line.strip()]


def _gap(mine: list[dict], ref: dict[int, float]) -> float | None:
    """Mean accuracy difference (points) to a reference method on the seeds both have."""
    paired = [r["accuracy"] * 100 - ref[r["seed"]] for r in mine if r["seed"] in ref]
    return statistics.mean(paired) if paired else None


def _table(part: str, rows: list[dict]) -> tuple[list[str], list[str], list[str]]:
    """The part's table, the methods below the probe and those below LoRA; each method is compared
    with the probe and with LoRA on the seeds both have (paired)."""
    methods = [m for m in PARTS[part][2] if any(r["method"] == m for r in rows)]
    probe = {r["seed"]: r["accuracy"] * 100 for r in rows if r["method"] == "probe"}
    lora = {r["seed"]: r["accuracy"] * 100 for r in rows if r["method"] == "lora"}
    lines = [
        (
            "| method | test accuracy % (mean ± std) | vs probe (pt, same seeds) | vs LoRA (pt) | "
            "trainable | trainable % | peak RSS (MiB) | step (s) | seeds | beats probe |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    losers, below_lora = [], []
    for m in methods:
        mine = sorted((r for r in rows if r["method"] == m), key=_seed)
        accs = [r["accuracy"] * 100 for r in mine]
        mean, std = statistics.mean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0)
        gap, to_lora = _gap(mine, probe), _gap(mine, lora)
        beats = "—" if m == "probe" or gap is None else ("yes" if gap > 0 else "**no**")
        if beats == "**no**":
            losers.append(m)
        if m not in ("probe", "lora") and to_lora is not None and to_lora < 0:
            below_lora.append(m)
        shown_gap = "—" if m == "probe" or gap is None else f"{gap:+.2f}"
        shown_lora = "—" if m in ("probe", "lora") or to_lora is None else f"{to_lora:+.2f}"
        lines.append(
            f"| {m} | {mean:.2f} ± {std:.2f} | {shown_gap} | {shown_lora} | "
            f"{mine[0]['trainable']:,} | {mine[0]['trainable_percent']:.3f} | "
            f"{statistics.median(r['peak_rss_mb'] for r in mine):.0f} | "
            f"{min(r['step_s'] for r in mine):.3f} | {len(mine)} | {beats} |"
        )
    return lines, losers, below_lora


def _seed(row: dict) -> int:
    return row["seed"]


def _key(r: dict) -> tuple:
    """What a row ran with: a cached row is reused only for the same settings."""
    return (
        r["part"],
        r["method"],
        r["seed"],
        r["train_limit"],
        r["eval_limit"],
        r.get("max_length", 128),
        lr_of_row(r),
        options_of_row(r),
        r.get("validation", False),
    )


def _selection_table(methods: list[tuple], lrs: list[float], rows: dict, seed: int) -> str:
    """Validation accuracy of each (part, method) at each learning rate; * marks the best."""
    lines = [
        f"| part | method | options | {' | '.join(f'lr {lr:g}' for lr in lrs)} | best lr |",
        "|---|---|---|" + "---|" * len(lrs) + "---|",
    ]
    for part, method, opts in methods:
        accs = {
            k[6]: rows[k]["accuracy"] * 100
            for k in rows
            if k[:3] == (part, method, seed) and k[7] == opts
        }
        best = max(accs, key=accs.get) if accs else None
        cells = [
            "—" if lr not in accs else f"{accs[lr]:.2f}{'*' if lr == best else ''}" for lr in lrs
        ]
        lines.append(f"| {part} | {method} | {opts} | {' | '.join(cells)} | "
                     f"{'—' if best is None else f'{best:g}'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", nargs="+", choices=list(PARTS), default=list(PARTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", help="methods to run (default: all of the part)")
    ap.add_argument("--train-limit", type=int, default=3000, help="training examples (one epoch)")
    ap.add_argument("--eval-limit", type=int, default=1500, help="test (or validation) examples")
    ap.add_argument("--max-length", type=int, default=128, help="MiniLM tokens (text part)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each in its own process)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    ap.add_argument(
        "--select-lr",
        nargs="+",
        metavar="METHOD",
        help="pick learning rates: train these methods with the first seed at each --lrs and print "
        "their accuracy on the validation split (nothing is written to RESULTS.md)",
    )
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2],
                    help="the grid of --select-lr")
    ap.add_argument("--opt", nargs="+", default=[], metavar="KEY=VALUE",
                    help="with --select-lr: spec options over the table's (a size to try)")
    ap.add_argument(
        "--cached-only",
        action="store_true",
        help="render the table from the cached rows only (list the missing ones instead of running "
        "them)",
    )
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--child-lr", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--child-options", help=argparse.SUPPRESS)
    ap.add_argument("--child-validation", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        part, method, seed = args.child
        row = run_one(
            part,
            method,
            int(seed),
            args.train_limit,
            args.eval_limit,
            args.max_length,
            lr=args.child_lr,
            options=None if args.child_options is None else json.loads(args.child_options),
            validation=args.child_validation,
            threads=args.threads,
        )
        print(json.dumps(row))
        return
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    done = {_key(r): r for r in _cached()}
    common = (args.train_limit, args.eval_limit, args.max_length)
    if args.select_lr:
        extra = {}  # KEY=VALUE, the value read as JSON where it is JSON (as the CLI's --opt)
        for item in args.opt:
            k, _, v = item.partition("=")
            try:
                extra[k] = json.loads(v)
            except json.JSONDecodeError:
                extra[k] = v
        picks = [
            (part, method, json.dumps({**PARTS[part][2][method][0], **extra}, sort_keys=True))
            for part in args.part
            for method in args.select_lr
            if method in PARTS[part][2]
        ]
        wanted = [
            (part, method, args.seeds[0], *common, lr, opts, True)
            for part, method, opts in picks
            for lr in (args.lrs if method != "probe" or extra else [PARTS[part][2][method][1]])
        ]
    else:
        wanted = [
            (
                part,
                method,
                seed,
                *common,
                PARTS[part][2][method][1],
                json.dumps(PARTS[part][2][method][0], sort_keys=True),
                False,
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
            "--threads",
            str(args.threads),
            "--child-lr",
            repr(k[6]),
            "--child-options",
            k[7],
        ] + (["--child-validation"] if k[8] else [])
        n = str(args.threads)
        env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
        env["TOKENIZERS_PARALLELISM"] = "false"
        for attempt in range(3):  # the working tree is shared: a run can meet a file mid-edit
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if proc.returncode == 0:
                break
            print(f"{name(k)} failed (try {attempt + 1} of 3):\n{proc.stderr[-2000:]}", flush=True)
            time.sleep(60)
        return proc

    def name(k: tuple) -> str:
        return f"{k[0]} {k[1]} seed {k[2]}" + (f" lr {k[6]:g} {k[7]} (validation)" if k[8] else "")

    t0 = time.time()
    # each run is its own process; the pool's threads only wait
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        missing = [k for k in wanted if k not in done]
        if args.cached_only:
            if missing:
                print("not run (--cached-only): " + ", ".join(map(name, missing)), flush=True)
            missing = []
        running = {pool.submit(child, k): k for k in missing}
        for future in as_completed(running):
            k, proc = running[future], future.result()
            if proc.returncode != 0:
                print(f"{name(k)} FAILED:\n{proc.stderr[-3000:]}", flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            if _key(row) != k:
                print(f"{name(k)}: the child ran other settings: {_key(row)}", flush=True)
                continue
            done[k] = row
            with CACHE.open("a") as fh:
                fh.write(json.dumps(done[k]) + "\n")
            print(json.dumps(done[k]), flush=True)
    if missing:
        print(f"{len(missing)} run(s) in {time.time() - t0:.0f} s", flush=True)
    if args.select_lr:
        got = {k: done[k] for k in wanted if k in done}
        print(
            f"\nValidation accuracy % (seed {args.seeds[0]}, {args.train_limit} training examples, "
            f"{args.eval_limit} validation examples):\n"
        )
        lrs = sorted({k[6] for k in wanted})
        print(_selection_table(picks, lrs, got, args.seeds[0]))
        return
    rows: dict[str, list[dict]] = {p: [] for p in args.part}
    for k in wanted:
        if k in done:
            rows[k[0]].append(done[k])
    shown = "".join(" " + a for a in sys.argv[1:] if a not in ("--cached-only", "--no-write"))
    threads = "/".join(sorted({str(r.get("threads", "?")) for p in rows.values() for r in p}))
    ran = {p: [m for m in PARTS[p][2] if any(r["method"] == m for r in rows[p])] for p in args.part}
    body = [f"Command: `.venv/bin/python bench/bench_methods.py{shown}`"]
    body.append(
        f"(one epoch over {args.train_limit} training examples of the seed-0 split, batch 16 text "
        f"at {args.max_length} tokens / 32 images, {args.eval_limit} test examples; seeds "
        f"{', '.join(map(str, args.seeds))} change the initialisation and data order; {threads} "
        "CPU thread(s) per run at low priority on the shared machine beside other benchmarks, so "
        "step times (the median step of the least loaded run) are indicative only). Learning "
        "rates: "
        + "; ".join(
            f"{p}: " + ", ".join(f"{m} {PARTS[p][2][m][1]:g}" for m in ran[p])
            for p in args.part
            if ran[p]
        )
        + ". Spec options (the others at their defaults): "
        + "; ".join(
            f"{p}: "
            + ", ".join(f"{m} {json.dumps(PARTS[p][2][m][0])}" for m in ran[p] if PARTS[p][2][m][0])
            for p in args.part
            if ran[p]
        )
        + "."
    )
    for part in args.part:
        if not rows[part]:
            continue
        data, model_name, _, _ = PARTS[part]
        lines, losers, below_lora = _table(part, rows[part])
        body.append(f"\n**{data}, {model_name}**\n\n" + "\n".join(lines))
        body.append(
            "\nEvery method beats the linear probe."
            if not losers
            else f"\nBelow the linear probe: {', '.join(losers)}."
        )
        new = [m for m in ISSUE19 if m in ran[part]]
        if new:
            body.append(
                f"The rows from {new[0]} on are issue 19's weight-delta methods, on the same "
                "attention query/value layers as LoRA (RoAd on every Linear: its default size "
                "ended at the probe); their learning rates were picked on the "
                "validation split (seed 0, `--select-lr`; the accuracies per rate are in the "
                "comments of bench/bench_methods.py), and TrainableTokens, which trains embedding "
                "rows for new tokens, has no place in a classifier over a fixed vocabulary."
            )
            if below_lora:
                body.append(
                    "Below LoRA r=8 on the same seeds (mean): "
                    + ", ".join(m for m in below_lora if m in new)
                    + "; docs/methods.md says when to pick them anyway."
                )
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        from _results import write_section

        write_section(_heading(args.only), text)


def _heading(only: list[str] | None) -> str:
    """The RESULTS.md section: the whole zoo, or the issue-19 methods' own table when only they
    (with the probe and LoRA as references) were asked for."""
    if only and set(only) <= {"probe", "lora", *ISSUE19} and set(only) & set(ISSUE19):
        return "Method zoo: issue 19's weight-delta methods vs the probe and LoRA"
    return "Method zoo: every method vs the linear probe (issue 5)"

if __name__ == "__main__":
    main()
