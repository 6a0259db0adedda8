"""Run a strategy over a stream with deltatune's trainer, and the continual-learning metrics.

Metrics follow Lopez-Paz & Ranzato (GEM, https://arxiv.org/abs/1706.08840) and Chaudhry et al.
(https://arxiv.org/abs/1801.10112), with ``R[i][j]`` = test accuracy on task j after training
task i: average accuracy = mean_j R[T-1][j];
forgetting = mean over j < T-1 of (max_{i<T-1} R[i][j] − R[T-1][j]);
BWT = mean over j < T-1 of (R[T-1][j] − R[j][j]);
FWT = mean over j > 0 of (R[j-1][j] − b_j), b_j being the accuracy of the model before any training.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..data import Dataset
from ..train.optim import Plan
from .strategies import Strategy
from .streams import ContinualError, Stream


@dataclass
class ContinualResult:
    stream: str
    strategy: str
    tasks: list[str]
    accuracy_matrix: list[list[float]]
    initial_accuracy: list[float]
    average_accuracy: float
    forgetting: float | None
    backward_transfer: float | None
    forward_transfer: float | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def metrics(matrix: list[list[float]], initial: list[float]) -> dict[str, float | None]:
    """Average accuracy, forgetting, BWT and FWT of an accuracy matrix (see the module
    docstring)."""
    T = len(matrix)
    if T == 0 or any(len(row) != len(matrix[0]) for row in matrix):
        raise ContinualError("the accuracy matrix must be a non-empty list of equal-length rows")
    last = matrix[-1]
    out: dict[str, float | None] = {
        "average_accuracy": sum(last) / len(last),
        "forgetting": None,
        "backward_transfer": None,
        "forward_transfer": None,
    }
    if T > 1 and len(last) == T:
        out["forgetting"] = sum(
            max(matrix[i][j] for i in range(T - 1)) - last[j] for j in range(T - 1)
        ) / (T - 1)
        out["backward_transfer"] = sum(last[j] - matrix[j][j] for j in range(T - 1)) / (T - 1)
        out["forward_transfer"] = sum(matrix[j - 1][j] - initial[j] for j in range(1, T)) / (T - 1)
    return out


class _TaskMasked(nn.Module):
    """Task-incremental evaluation: logits outside the task's classes are masked out."""

    def __init__(self, model: nn.Module, classes: list[int]) -> None:
        super().__init__()
        self.model, self.classes = model, classes

    def forward(self, **batch):
        logits = self.model(**batch)
        mask = torch.full_like(logits, float("-inf"))
        mask[..., self.classes] = 0
        return logits + mask


def _check_head(model: nn.Module, stream: Stream, collate: Callable) -> None:
    batch = collate(stream.tasks[0].test.examples[:2])
    batch.pop("labels", None)
    with torch.no_grad():
        width = model(**batch).shape[-1]
    if width != len(stream.label_names):
        raise ContinualError(
            f"the model's head has {width} outputs but stream {stream.name!r} has "
            f"{len(stream.label_names)} classes; build the model with "
            f"num_labels={len(stream.label_names)}"
        )


def run_stream(
    model: nn.Module,
    collate: Callable,
    stream: Stream,
    strategy: Strategy,
    config,
    *,
    spec=None,
    head: list[str] | None = None,
    task_ids: bool = False,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> ContinualResult:
    """Train ``strategy`` task by task (``config``: a :class:`~deltatune.train.TrainConfig` per
    task) and evaluate every task after each one. ``task_ids=True`` evaluates with the task's
    classes only."""
    from ..train import evaluate, fit

    head = list(head or [])
    _check_head(model, stream, collate)
    say = log or (lambda _m: None)
    t0 = time.time()

    def accuracies(predictor: nn.Module) -> list[float]:
        row = []
        for task in stream.tasks:
            p = (
                _TaskMasked(predictor, task.classes)
                if task_ids and stream.scenario == "class"
                else predictor
            )
            row.append(evaluate(p, task.test, collate, task=stream.task_kind)["accuracy"])
        return row

    if config.max_steps:
        steps = config.max_steps
    else:  # optimizer steps a task takes on average (LAE's EMA, ZSCL's ensemble scale with it)
        per = [
            Plan(len(t.train), config.batch_size, 1, config.grad_accum).steps_per_epoch
            * config.epochs
            for t in stream.tasks
        ]
        steps = max(1, round(sum(per) / len(per)))
    strategy.configure(config, steps, stream.scenario, len(stream.tasks))
    strategy.setup(model, spec, head, collate)
    initial = accuracies(strategy.predictor())
    matrix: list[list[float]] = []
    if getattr(strategy, "joint", False):
        union = Dataset(
            f"{stream.name}[all]",
            stream.task_kind,
            [e for t in stream.tasks for e in t.train.examples],
            stream.label_names,
        )
        steps = config.max_steps * len(stream.tasks) if config.max_steps else None
        cfg = type(config)(**{**asdict(config), "max_steps": steps})
        fit(model, union, collate, cfg, task=stream.task_kind, out_dir=_sub(out_dir, "joint"))
        matrix.append(accuracies(strategy.predictor()))
        say(f"joint: {['%.3f' % a for a in matrix[-1]]}")
    else:
        for t, task in enumerate(stream.tasks):
            strategy.before_task(t, task)
            if strategy.trains(t):
                fit(
                    strategy.trainee(t, task),
                    task.train,
                    collate,
                    config,
                    task=stream.task_kind,
                    callbacks=strategy.callbacks(t, task),
                    out_dir=_sub(out_dir, f"task{t}"),
                )
            strategy.after_task(t, task)
            matrix.append(accuracies(strategy.predictor()))
            say(f"after {task.name}: {['%.3f' % a for a in matrix[-1]]}")
    m = metrics(matrix, initial)
    result = ContinualResult(
        stream.name,
        strategy.name if not getattr(strategy, "joint", False) else "joint",
        [t.name for t in stream.tasks],
        matrix,
        initial,
        m["average_accuracy"],
        m["forgetting"],
        m["backward_transfer"],
        m["forward_transfer"],
        time.time() - t0,
    )
    return result


def _sub(out_dir, name: str):
    return None if out_dir is None else Path(out_dir) / name


def plot_matrix(result: ContinualResult, path: str | Path) -> Path:
    """Heatmap PNG of the accuracy matrix (rows: after training task i; columns: task j)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.files import save_figure

    m = result.accuracy_matrix
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(result.tasks), 1.0 + 0.7 * len(m)))
    im = ax.imshow([[100 * v for v in row] for row in m], vmin=0, vmax=100, cmap="viridis")
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            ax.text(
                j,
                i,
                f"{100 * v:.0f}",
                ha="center",
                va="center",
                color="white" if v < 0.6 else "black",
                fontsize=8,
            )
    ax.set_xticks(range(len(result.tasks)), result.tasks, rotation=30, ha="right", fontsize=8)
    rows = ["all tasks"] if len(m) == 1 else [f"after {t}" for t in result.tasks]
    ax.set_yticks(range(len(m)), rows, fontsize=8)
    ax.set_title(f"{result.strategy} on {result.stream}: test accuracy %", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
