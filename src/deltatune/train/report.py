"""What a run reports: the result object, metrics.json, the learning-curve PNG, the progress bar."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..io.files import atomic_write, save_figure

METRICS = "metrics.json"
CURVE = "learning_curve.png"


@dataclass
class TrainResult:
    """What :func:`fit` did. ``final``: the last evaluation; ``best``: the best one (with its epoch
    and step), whose tensors the model holds at the end when ``keep_best`` is on."""

    steps: int
    epochs_done: int
    seconds: float  # wall time of this call, evaluations and checkpoints included
    train_seconds: float  # time in training steps only (this call)
    samples: int  # training examples seen in this call, all processes together
    samples_per_second: float
    final: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)
    train_loss: float | None = None  # mean loss of the last epoch's (or last run's) steps
    peak_rss_mb: float | None = None  # this process's peak resident memory
    resumed_from_step: int | None = None
    out_dir: str | None = None
    metrics_path: str | None = None
    curve_path: str | None = None
    checkpoint_path: str | None = None


def peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (
        peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
    )  # bytes on macOS, KiB elsewhere


def write_metrics(out_dir: Path, metrics: dict[str, Any]) -> Path:
    path = Path(out_dir) / METRICS
    text = json.dumps(metrics, indent=1, default=str) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def plot_curve(
    out_dir: Path, steps: list[dict[str, Any]], evals: list[dict[str, Any]], metric: str
) -> Path | None:
    """Training loss per step (and its running mean), evaluation loss and ``metric`` per epoch."""
    if not steps:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional
        return None
    xs = [s["step"] for s in steps]
    losses = [s["loss"] for s in steps]
    window = max(1, len(losses) // 25)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig, (ax, ax_lr) = plt.subplots(
        2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    if window > 1:  # noisy per-step losses: show them faintly under their running mean
        ax.plot(xs, losses, lw=0.8, alpha=0.35, color="tab:blue", label="train loss")
        ax.plot(xs, smooth, lw=1.6, color="tab:blue", label=f"train loss (mean of {window})")
    else:
        ax.plot(xs, losses, lw=1.4, color="tab:blue", label="train loss")
    if evals:
        ax.plot([e["step"] for e in evals], [e.get("loss", float("nan")) for e in evals], "o-",
                color="tab:orange", label="eval loss")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if evals and metric != "loss" and metric in evals[0]:
        ax_m = ax.twinx()
        ax_m.plot([e["step"] for e in evals], [e[metric] for e in evals], "s--", color="tab:green",
                  label=f"eval {metric}")
        ax_m.set_ylabel(f"eval {metric}")
        h2, l2 = ax_m.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    # Above the plot: inside it the legend would hide curves of one of the two y-axes.
    ax.legend(
        handles,
        labels,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.01),
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    ax_lr.plot(xs, [s["lr"] for s in steps], color="tab:gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out_dir) / CURVE
    return save_figure(fig, path, dpi=110)


class ProgressBar:
    """A rich progress bar with loss and samples/s; silent when disabled or rich is missing.
    ``subtask`` adds a second bar for a while (the evaluation's examples during training)."""

    def __init__(self, enabled: bool, total: int, done: int, label: str = "train") -> None:
        self._bar = None
        if not enabled:
            return
        try:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
        except ImportError:
            return
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self._bar.start()
        self._task = self._bar.add_task(label, total=total, completed=done, info="")

    def update(self, step: int, loss: float, rate: float) -> None:
        if self._bar is not None:
            self._bar.update(
                self._task, completed=step, info=f"loss {loss:.4f} · {rate:,.1f} samples/s"
            )

    def advance(self, n: int) -> None:
        """``n`` more done (an evaluation's examples)."""
        if self._bar is not None:
            self._bar.advance(self._task, n)

    @contextlib.contextmanager
    def subtask(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        """A second bar of ``total`` items while the block runs; yields its ``advance(n)``."""
        if self._bar is None:
            yield lambda n: None
            return
        task = self._bar.add_task(label, total=total, info="")
        try:
            yield lambda n: self._bar.advance(task, n)
        finally:
            self._bar.remove_task(task)

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
