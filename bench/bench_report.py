"""The HTML report (issue 24): `deltatune report` over one real run of every job, its size and the
time to build it and to render it in headless Chromium.

    .venv/bin/python bench/bench_report.py                      # runs in .cache/report_runs
    .venv/bin/python bench/bench_report.py --runs DIR --repeat 3

Every run is a small real run of the CLI on the bundled data (the small CNN on MNIST / MNIST-C,
MiniLM on tweet sentiment for the search, SmolLM2 for generation), made once and reused: two train
runs (LoRA r=4 and r=8) and their evaluations, an export, two compressions, a merge of the two
exported models, a continual stream, a search, two test-time adaptations, a drift detection
(streamed in windows), an accuracy estimate and a generation. The report is built over all of them
``--repeat`` times (median wall time of the command, its CPU time, and the time inside
write_report without Python's start-up); Chromium renders it to a screenshot (median wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "deltatune.cli.app"]
CNN = ["--model", "small-cnn"]


def runs(root: Path) -> dict[str, list[str]]:
    """name -> CLI arguments (without --out), each run after the runs it reads."""
    r = str(root)
    merge_yaml = root / "merge.yaml"
    merge_yaml.write_text(
        "merge_method: ties\n"
        f"base_model: {r}/merge-inputs/base\n"
        "models:\n"
        f"  - model: {r}/merge-inputs/r4\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        f"  - model: {r}/merge-inputs/r8\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        "parameters: {normalize: true}\n"
    )
    train = ["train", *CNN, "--data", "mnist", "--method", "lora", "--epochs", "2", "--limit",
             "1500", "--batch-size", "32", "--lr", "3e-3", "--targets", "features.0,features.4"]
    return {
        "train-r4": [*train, "--rank", "4"],
        "train-r8": [*train, "--rank", "8"],
        "eval-r4-fog": ["eval", "--adapter", f"{r}/train-r4/adapter", "--data", "mnist-c:fog:3",
                        "--limit", "500"],
        "eval-r8-fog": ["eval", "--adapter", f"{r}/train-r8/adapter", "--data", "mnist-c:fog:3",
                        "--limit", "500"],
        "export-r4": ["export", "--adapter", f"{r}/train-r4/adapter"],
        "export-r8": ["export", "--adapter", f"{r}/train-r8/adapter"],
        "compress-int8": ["compress", f"{r}/train-r8/adapter", "--codec", "int8"],
        "compress-compeft": ["compress", f"{r}/train-r8/adapter", "--codec", "compeft",
                             "--density", "0.1"],
        "merge-ties": ["merge", str(merge_yaml), "-q"],
        "continual-replay": ["continual", *CNN, "--stream", "split-mnist", "--strategy", "replay",
                             "--method", "lora", "--rank", "4", "--max-steps", "30", "--limit",
                             "1500", "--limit-test", "300"],
        "continual-sequential": ["continual", *CNN, "--stream", "split-mnist", "--strategy",
                                 "sequential", "--method", "lora", "--rank", "4", "--max-steps",
                                 "30", "--limit", "1500", "--limit-test", "300"],
        "search": ["search", "--model", "minilm", "--data", "tweet-sentiment", "--budget", "0.5%",
                   "--trials", "3", "--max-steps", "3", "--limit", "48", "--batch-size", "8",
                   "--methods", "lora,ia3", "--positions", "qv"],
        "adapt-tent": ["adapt", *CNN, "--adapter", f"{r}/train-r8/adapter", "--data",
                       "mnist-c:fog:3", "--method", "tent", "--limit", "512", "--batch-size", "64"],
        "adapt-bn": ["adapt", *CNN, "--adapter", f"{r}/train-r8/adapter", "--data",
                     "mnist-c:fog:3", "--method", "bn", "--limit", "512", "--batch-size", "64"],
        "detect-stream": ["detect", *CNN, "--adapter", f"{r}/train-r8/adapter", "--reference",
                          "mnist", "--target", "mnist-c:fog:3", "--test", "bbsd", "--window",
                          "100", "--limit", "400"],
        "estimate": ["estimate", *CNN, "--adapter", f"{r}/train-r8/adapter", "--reference",
                     "mnist", "--target", "mnist-c:contrast:3", "--limit", "400"],
        "generate": ["generate", "--model", "smollm2", "--prompt", "What is the capital of France?",
                     "--prompt", "Name a colour.", "--max-new-tokens", "8"],
    }


def make_runs(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, args in runs(root).items():
        out = root / name
        if (out / "results.json").is_file():
            continue
        if name == "merge-ties":
            _merge_inputs(root)
        t0 = time.time()
        proc = subprocess.run([*CLI, *args, "--out", str(out)], capture_output=True, text=True,
                              cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed: {proc.stderr.strip().splitlines()[-1:]}")
        print(f"{name:22} {time.time() - t0:6.1f} s", flush=True)


def _merge_inputs(root: Path) -> None:
    """The merge's inputs: the two exported models and the frozen base they were trained from
    (train saves the small CNN's random-initialised base beside its adapter). BatchNorm's step
    counters differ between the two runs and merging refuses integer tensors that differ, so all
    three carry the base's counters."""
    from safetensors.torch import load_file, save_file

    frozen = load_file(str(root / "train-r4" / "adapter" / "base.safetensors"))
    for name, source in (("base", "export-r4"), ("r4", "export-r4"), ("r8", "export-r8")):
        out = root / "merge-inputs" / name
        out.mkdir(parents=True, exist_ok=True)
        state = load_file(str(root / source / "model.safetensors"))
        pick = (lambda k, v: frozen[k]) if name == "base" else (
            lambda k, v: v if v.is_floating_point() else frozen[k])
        save_file({k: pick(k, v).contiguous() for k, v in state.items()},
                  str(out / "model.safetensors"))


def _child_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def render(html: Path, png: Path) -> float:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return float("nan")
    with tempfile.TemporaryDirectory() as profile:
        t0 = time.perf_counter()
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--screenshot={png}",
                        "--window-size=1280,2000", html.resolve().as_uri()],
                       capture_output=True, check=True, timeout=120)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=ROOT / ".cache" / "report_runs")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    make_runs(args.runs)
    dirs = sorted(p for p in args.runs.iterdir() if (p / "results.json").is_file())
    out = args.runs.parent / "report_runs.html"
    build, inner, cpu, shots = [], [], [], []
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), _child_cpu()
        proc = subprocess.run([*CLI, "report", *map(str, dirs), "--out", str(out), "--overwrite"],
                              capture_output=True, text=True, cwd=ROOT)
        build.append(time.perf_counter() - t0)
        cpu.append(_child_cpu() - c0)
        if proc.returncode != 0:
            raise SystemExit(f"report failed: {proc.stderr.strip()}")
        # the CLI's own line: "... (N KiB, S s)", the time inside write_report (no startup)
        inner.append(float(proc.stdout.rsplit(", ", 1)[1].split(" s)")[0]))
        shots.append(render(out, out.with_suffix(".png")))
    kinds = sorted({json.loads((d / "results.json").read_text())["job"] for d in dirs})
    print(json.dumps({
        "runs": len(dirs), "kinds": kinds, "html_bytes": out.stat().st_size,
        "report_seconds_median": round(statistics.median(build), 2),
        "report_cpu_seconds_median": round(statistics.median(cpu), 2),
        "write_report_seconds_median": round(statistics.median(inner), 2),
        "render_seconds_median": round(statistics.median(shots), 2),
        "html": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
    }, indent=1))


if __name__ == "__main__":
    main()
