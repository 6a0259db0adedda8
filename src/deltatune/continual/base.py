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
    """Sequential fine-tuning; the other strategies override the hooks they need."""

    name = "sequential"

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

    def configure(self, config, steps_per_task: int) -> None:
        """Called by :func:`~deltatune.continual.run_stream` before ``setup`` with the per-task
        :class:`~deltatune.train.TrainConfig` and the optimizer steps each task will take."""
        self.config, self.steps_per_task = config, steps_per_task

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
