"""Config-search benchmark (issue 10): a 20-trial `deltatune search` on the 2-core machine, timed
whole.

    .venv/bin/python bench/bench_search.py                      # the reduced form, as in RESULTS.md
    .venv/bin/python bench/bench_search.py --backend ray        # the same with Ray Tune, 2 workers
    .venv/bin/python bench/bench_search.py --trials 4 --no-write   # smoke

Runs the CLI as its own process (`deltatune search --model minilm --data tweet-sentiment --budget
0.5% --trials 20 --max-steps 30 --limit 300`, each trial a fresh configuration trained for 30 steps
on 300 examples per split), measures its wall time and the peak resident memory of the process tree,
and reports the Pareto front the search wrote. Aim: 20 trials within 30 minutes, with a Pareto
front.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--budget", default="0.5%")
    ap.add_argument("--backend", choices=("optuna", "ray"), default="optuna")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench_search_")) / "search"
    cli = str(Path(sys.executable).with_name("deltatune"))
    cmd = [
        cli,
        "search",
        "--model",
        "minilm",
        "--data",
        "tweet-sentiment",
        "--budget",
        args.budget,
        "--trials",
        str(args.trials),
        "--max-steps",
        str(args.max_steps),
        "--limit",
        str(args.limit),
        "--backend",
        args.backend,
        "--out",
        str(out),
    ]
    load = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"deltatune search failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    results = json.loads((out / "results.json").read_text())
    shown = " ".join(a for a in cmd[1:] if not a.startswith(str(out.parent)))
    body = (
        "Command: `.venv/bin/python bench/bench_search.py"
        f"{''.join(' ' + a for a in sys.argv[1:] if a != '--no-write')}` "
        f"(runs `deltatune {shown.replace(' --out', '')} --out DIR` as one process; load average "
        f"{load:.1f} at the start and {os.getloadavg()[0]:.1f} at the end on the shared 2-core "
        "machine).\n\n"
        "| figure | value | aim |\n|---|---|---|\n"
        f"| trials completed | {results['trials_done']} of {args.trials} ({results['candidates']} "
        f"configurations fit the budget of {results['budget']:,} parameters) | {args.trials} |\n"
        f"| wall time of the whole search | {seconds / 60:.1f} min | ≤ 30 min |\n"
        f"| peak RSS of the largest process | {peak:.0f} MiB | — |\n"
        f"| configurations on the Pareto front | {len(results['pareto'])} | ≥ 1 |\n\n"
        + results["table"].split("\n\n", 1)[1].strip()
        + "\n\n"
        f"Best validation accuracy: {results['best']['key']} "
        f"({results['best']['val_accuracy']:.4f}); with {args.max_steps} steps on {args.limit} "
        "examples every accuracy is a short-run estimate: the reduced form shows the search's "
        "machinery and cost, bench/bench_budget.py compares configurations trained properly."
    )
    print(body)
    if not args.no_write:
        from _results import write_section

        write_section(f"Config search: {args.trials} trials, {args.backend} (issue 10)", body)


if __name__ == "__main__":
    main()
