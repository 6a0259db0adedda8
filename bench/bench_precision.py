"""Accelerator settings on this CPU (issue 24): bf16 autocast, gradient checkpointing and
torch.compile against fp32, for MiniLM + LoRA on tweet-sentiment.

    nice -n 5 .venv/bin/python bench/bench_precision.py [--rounds 3] [--steps 24] [--write]

Each (setting, round) trains in its own process, so that its peak RSS is its own: MiniLM with
deltatune's default LoRA (r=8 on query/value) and a new 3-class head, batch 16, AdamW, ``--steps``
optimizer steps on the same examples in the same order. Step time is the median over the steps
after the first 6 (12 with compile: its first steps trace and compile). The settings run
interleaved, round after round (fp32, bf16, checkpointing, compile, fp32, ...), and each ratio is
taken against the fp32 run of its own round, then the median over rounds: the CPU is shared with
other jobs, so absolute seconds drift, ratios much less.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from _results import StepTimer  # noqa: E402

SETTINGS = {
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "checkpointing": {"gradient_checkpointing": True},
    "compile": {"compile": True},
    "bf16+checkpointing": {"precision": "bf16", "gradient_checkpointing": True},
}


def run(setting: str, steps: int) -> dict:
    import torch

    import deltatune as dt
    from deltatune.data import load_data
    from deltatune.models import load_model
    from deltatune.train import TrainConfig, fit

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    data = load_data("tweet-sentiment", "train", limit=steps * 16, seed=0)
    torch.manual_seed(0)
    entry = load_model("minilm", num_labels=len(data.label_names))
    dt.attach(entry.model, dt.LoRA(r=8, alpha=16, targets=list(entry.default_targets),
                                   trainable_modules=list(entry.head)), name="default")
    timer = StepTimer(first_from_start=True)
    cfg = TrainConfig(max_steps=steps, batch_size=16, lr=5e-4, progress=False,
                      eval_each_epoch=False, keep_best=False, **SETTINGS[setting])
    result = fit(entry.model, data, entry.collate, cfg, task=entry.task, callbacks=[timer])
    skip = 12 if "compile" in setting else 6
    return {"setting": setting, "step_s": statistics.median(timer.times[skip:]),
            "first_steps_s": sum(timer.times[:skip]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "final_train_loss": result.train_loss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--write", action="store_true", help="write the section of bench/RESULTS.md")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run(args.one, args.steps)), flush=True)
        return
    settings = [s.strip() for s in args.settings.split(",")]
    rows: dict[str, list[dict]] = {s: [] for s in settings}
    for r in range(args.rounds):
        for setting in settings:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", setting, "--steps", str(args.steps)],
                capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"},
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{setting} failed:\n{proc.stderr[-3000:]}", flush=True)
                continue
            row = json.loads(line[0][7:])
            rows[setting].append(row)
            print(f"round {r + 1} {setting}: step {row['step_s']:.3f} s, peak RSS "
                  f"{row['peak_rss_mb']:.0f} MB, loss {row['final_train_loss']:.4f}", flush=True)
    table = ["| setting | step time (median) | step time / fp32 | peak RSS | peak RSS / fp32 | "
             "first steps (warm-up) | train loss |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for setting in settings:
        runs = rows[setting]
        if not runs:
            continue
        step_ratio = statistics.median(a["step_s"] / b["step_s"]
                                       for a, b in zip(runs, rows["fp32"]))
        rss_ratio = statistics.median(a["peak_rss_mb"] / b["peak_rss_mb"]
                                      for a, b in zip(runs, rows["fp32"]))
        step = statistics.median(x["step_s"] for x in runs)
        rss = statistics.median(x["peak_rss_mb"] for x in runs)
        warm = statistics.median(x["first_steps_s"] for x in runs)
        loss = statistics.median(x["final_train_loss"] for x in runs)
        summary[setting] = {"step_ratio": step_ratio, "rss_ratio": rss_ratio, "step_s": step,
                            "peak_rss_mb": rss, "warmup_s": warm, "train_loss": loss}
        table.append(f"| {setting} | {step:.3f} s | {step_ratio:.2f}x | {rss:.0f} MB | "
                     f"{rss_ratio:.2f}x | {warm:.1f} s | {loss:.4f} |")
    text = "\n".join(table)
    print(text)
    out = ROOT / ".cache" / "bench_precision.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    if args.write:
        from _results import write_section

        write_section(
            "Accelerator settings (issue 24)",
            "MiniLM + LoRA (r=8, query/value, new head) on tweet-sentiment, batch 16, "
            f"{args.steps} optimizer steps per run, each run its own process (2 threads), "
            f"{args.rounds} rounds interleaved; ratios against the fp32 run of the same round, "
            "median over rounds (the CPU was shared with other jobs).\n\n"
            f"```\nnice -n 5 .venv/bin/python bench/bench_precision.py --rounds {args.rounds} "
            f"--steps {args.steps} --write\n```\n\n" + text,
        )


if __name__ == "__main__":
    main()
