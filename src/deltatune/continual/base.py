"""The strategy base class: sequential fine-tuning, and the small hook objects every strategy
uses."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.host import get_module
from ..core.model import attach
from .streams import ContinualError, Task


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class Strategy:
    """Sequential fine-tuning; the other strategies override the hooks they need.

    ``mask_old_classes``: on a class-incremental stream the training loss sees only the current
    task's classes (the other logits are masked out of the cross-entropy), as in the papers whose
    model has one head per task (LwF), a classifier of the current task's class names (ZSCL, O-LoRA)
    or L2P's training protocol (LAE, the prompt pools). Without it the shared head's new rows
    out-score every old class and the strategy ends at the last task's classes alone."""

    name = "sequential"
    mask_old_classes = False
    scenario = "domain"  # set by run_stream from the stream
    num_tasks = 2

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.options())
        if unknown:
            raise ContinualError(f"strategy {self.name!r} has no option {sorted(unknown)[0]!r}; "
                                 f"options: {', '.join(self.options()) or 'none'}")
        self.__dict__.update({**self.options(), **options})
        self.seen: list[int] = []

    @classmethod
    def options(cls) -> dict[str, Any]:
        return {}

    def validate(self, spec) -> None:
        """Raise if this strategy cannot work with ``spec`` (None = full fine-tuning)."""

    def configure(self, config, steps_per_task: int, scenario: str = "domain",
                  num_tasks: int = 2) -> None:
        """Called by :func:`~deltatune.continual.run_stream` before ``setup`` with the per-task
        :class:`~deltatune.train.TrainConfig`, the optimizer steps each task will take, the
        stream's scenario (``"class"``/``"domain"``) and its number of tasks."""
        self.config, self.steps_per_task = config, steps_per_task
        self.scenario, self.num_tasks = scenario, num_tasks

    def trains(self, t: int) -> bool:
        """Whether task ``t`` is trained with the trainer (prototype strategies only read
        features)."""
        return True

    def trainee(self, t: int, task: Task) -> nn.Module:
        """The module the trainer fits on task ``t``: the model, or the model with the other tasks'
        classes masked out of the loss (``mask_old_classes`` on a class-incremental stream)."""
        if self.mask_old_classes and self.scenario == "class":
            return TaskMasked(self.model, task.classes, self)
        return self.model

    def setup(self, model: nn.Module, spec, head: list[str], collate: Callable) -> None:
        self.validate(spec)
        self.model, self.spec, self.head, self.collate = model, spec, head, collate
        if spec is None:
            model.requires_grad_(True)
        else:
            attach(model, spec, "pet")
            self._unfreeze_head()

    def _unfreeze_head(self) -> None:
        for h in self.head:
            try:
                get_module(self.model, h).requires_grad_(True)
            except AttributeError:
                raise ContinualError(
                    f"the model has no head module {h!r}; pass the classifier's name"
                ) from None

    def before_task(self, t: int, task: Task) -> None:
        pass

    def callbacks(self, t: int, task: Task) -> list:
        return []

    def after_task(self, t: int, task: Task) -> None:
        self.seen = sorted(set(self.seen) | set(task.classes))

    def predictor(self) -> nn.Module:
        return self.model


class TaskMasked(nn.Module):
    """Logits outside ``classes`` pushed to -1e4 (the cross-entropy then runs over the task's own
    classes, with no gradient to the other rows); the unmasked logits are left on ``sink.raw`` for
    penalties that read old classes (LwF's distillation)."""

    def __init__(self, model: nn.Module, classes: list[int], sink: Any = None) -> None:
        super().__init__()
        self.model, self.classes, self.sink = model, list(classes), sink

    def forward(self, **batch):
        logits = self.model(**batch)
        if self.sink is not None:
            self.sink.raw = logits
        return mask_logits(logits, self.classes)


def mask_logits(logits: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """``logits`` with every class outside ``classes`` at -1e4 (no gradient reaches them)."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[classes] = True
    return logits.masked_fill(~keep, -1e4)


def head_rows(model: nn.Module, head: list[str]) -> list[nn.Linear]:
    """The linear classifier(s) among ``head`` (rows = classes)."""
    return [m for h in head for m in get_module(model, h).modules() if isinstance(m, nn.Linear)
            and m.out_features > 1]


class KeepRows:
    """Callback restoring the rows of the head's classes in ``classes`` after every optimizer step:
    an earlier task's class scores stay exactly as they were (what the frozen classifier of O-LoRA's
    language model does), whatever the optimizer's moments or weight decay would do to them."""

    def __init__(self, heads: list[nn.Linear], classes: list[int]) -> None:
        self.classes = list(classes)
        self.saved = [(m, m.weight.detach()[self.classes].clone(),
                       None if m.bias is None else m.bias.detach()[self.classes].clone())
                      for m in heads]

    @torch.no_grad()
    def on_step_end(self, model, step) -> None:
        for m, w, b in self.saved:
            m.weight[self.classes] = w
            if b is not None:
                m.bias[self.classes] = b


class _Penalty:
    def __init__(self, fn) -> None:
        self.penalty = fn


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, old: list[int], temperature: float, lam: float
) -> torch.Tensor:
    """λ·T²·KL(teacher ‖ student) at temperature T over the classes seen before (``old``; all when
    empty or when the head has no other classes), as in LwF and ZSCL."""
    cols = old if old and student.shape[-1] > len(old) else slice(None)
    T = temperature
    return (
        lam
        * T
        * T
        * F.kl_div(
            F.log_softmax(student[:, cols] / T, -1),
            F.softmax(teacher[:, cols] / T, -1),
            reduction="batchmean",
        )
    )
