"""LISA memory benchmark (issue 10): full fine-tuning of MiniLM vs LISA (2 of 6 layers at a time).

    .venv/bin/python bench/bench_lisa.py

Each case runs in its own process (peak RSS is its own): MiniLM + new head on BBC News, batch 16 x
128 tokens, AdamW, 12 optimizer steps (LISA re-draws every 4, so several blocks get optimizer state,
as in a real run); peak resident memory of the process and median step time.
"""

from __future__ import annotations

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


class _Timer:
    def __init__(self) -> None:
        self.times, self.last = [], None

    def on_step_end(self, model, step) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def run(case: str) -> dict:
    import torch

    from deltatune.data import load_data
    from deltatune.models import load_model
    from deltatune.train import TrainConfig, fit

    torch.manual_seed(0)
    entry = load_model("minilm", num_labels=5)
    data = load_data("bbc-news", "train", limit=12 * 16)
    timer = _Timer()
    cfg = TrainConfig(
        max_steps=12,
        batch_size=16,
        lr=5e-5,
        progress=False,
        eval_each_epoch=False,
        keep_best=False,
        lisa_layers=2 if case == "lisa" else None,
        lisa_interval=4,
    )
    fit(entry.model, data, entry.collate, cfg, task=entry.task, callbacks=[timer])
    return {"case": case, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_s": statistics.median(timer.times)}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--case":
        print(json.dumps(run(sys.argv[2])))
        return
    rows = {}
    for case in ("full", "lisa"):
        out = subprocess.run(
            [sys.executable, __file__, "--case", case], capture_output=True, text=True, check=True
        )
        rows[case] = json.loads(out.stdout.strip().splitlines()[-1])
        print(rows[case], flush=True)
    full, lisa = rows["full"], rows["lisa"]
    body = (
        "Command: `.venv/bin/python bench/bench_lisa.py` "
        + __doc__.split("\n\n")[2].strip().replace("\n", " ")
        + "\n\n| case | peak RSS (MiB) | step (s, median) |\n|---|---|---|\n"
        f"| full fine-tuning | {full['peak_rss_mb']:.0f} | {full['step_s']:.2f} |\n"
        f"| LISA, 2 of 6 layers | {lisa['peak_rss_mb']:.0f} | {lisa['step_s']:.2f} |\n\n"
        f"LISA / full: peak RSS {lisa['peak_rss_mb'] / full['peak_rss_mb']:.3f}x, step time "
        f"{lisa['step_s'] / full['step_s']:.2f}x (shared 2-core machine: step times indicative)."
    )
    print(body)
    from _results import write_section

    write_section("LISA layer sampling: memory (issue 10)", body)


if __name__ == "__main__":
    main()
