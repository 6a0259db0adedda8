"""Helpers the benchmarks share: write one benchmark's section into bench/RESULTS.md (leaving the
other sections alone), and time optimizer steps."""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\nEvery figure below was measured by the command shown in its section.\n"
)


def write_section(heading: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the ``## heading`` section of RESULTS.md with ``body``."""
    text = path.read_text() if path.exists() else HEADER
    section = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class StepTimer:
    """Trainer callback: wall time of each optimizer step. By default the time between consecutive
    steps (the first step, with its warm-up, is not timed); with ``first_from_start`` the first is
    timed from the start of training, so that ``times[:k]`` holds the warm-up."""

    def __init__(self, first_from_start: bool = False) -> None:
        self.first_from_start = first_from_start
        self.last: float | None = None
        self.times: list[float] = []

    def on_train_start(self, model) -> None:
        self.last = time.perf_counter() if self.first_from_start else None

    def on_step_end(self, model, step: int) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now

    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")
