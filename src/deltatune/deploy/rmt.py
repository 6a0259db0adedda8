"""RMT: a robust mean teacher trained with symmetric cross-entropy, with optional source replay."""

from __future__ import annotations

import itertools
from typing import Any, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .base import GradientTTA, register_method
from .batch import call_model, with_logits
from .errors import DeployError
from .roid import symmetric_ce
from .stream import batch_labels
from .views import View, weak_view


@register_method
class RMT(GradientTTA):
    """RMT: the student learns from an exponential-moving-average teacher through the symmetric
    cross-entropy (on the batch and on a ``view`` of it), and predicts with the teacher as an
    ensemble (sum of both logits).

    Döbler, Marsden & Yang, "Robust Mean Teacher for Continual and Gradual Test-Time Adaptation",
    CVPR 2023, https://arxiv.org/abs/2211.13081. The symmetric cross-entropy has gradients that do
    not blow up on wrong, confident teacher labels, unlike a mean teacher's plain cross-entropy.
    With ``source_data`` (an iterable of labelled source batches, ``(x, y)`` or dicts with
    ``labels``) each step adds ``source_weight`` times the cross-entropy on the next source batch
    (the paper's source replay). The paper's contrastive alignment to source prototypes and its
    warm-up are left out. The teacher shares the frozen weights with the student (only the adapted
    parameters are copied), as in CoTTA.
    """

    method: ClassVar[str] = "rmt"

    def __init__(
        self,
        model: nn.Module,
        *,
        ema: float = 0.999,
        source_data: Iterable[Any] | None = None,
        source_weight: float = 1.0,
        view: View | None = None,
        seed: int = 0,
        **common: Any,
    ) -> None:
        if not 0 <= ema <= 1:
            raise DeployError(
                f"rmt: ema={ema} must lie in [0, 1] (the teacher's weight on its old value)"
            )
        if source_weight < 0:
            raise DeployError(f"rmt: source_weight={source_weight} must be >= 0")
        self.ema, self.source_weight, self.seed = ema, source_weight, seed
        self.view = view or weak_view
        self.source_batches = list(source_data) if source_data is not None else []
        if source_data is not None and not self.source_batches:
            raise DeployError("rmt: source_data yielded no batches; pass labelled batches or None")
        if any(batch_labels(b) is None for b in self.source_batches):
            raise DeployError(
                "rmt: every source_data batch needs labels: (x, y) or a dict with 'labels'"
            )
        super().__init__(model, **common)
        self.reset_state()

    def reset_state(self) -> None:
        self.teacher = {n: t.clone() for n, t in self._source.items()}
        self.generator = torch.Generator().manual_seed(self.seed)
        self._replay = itertools.cycle(self.source_batches) if self.source_batches else None

    def adapt_step(self, args: tuple, kwargs: dict) -> Any:
        output = self.model(*args, **kwargs)
        student = self.logits(output)
        with torch.no_grad():
            teacher = self.logits(functional_call(self.model, self.teacher, args, kwargs))

        def loss_fn() -> torch.Tensor:
            loss = symmetric_ce(student, teacher).mean()
            other = self.view(args, kwargs, self.generator)
            if other is not None:
                aug = self.logits(self.model(*other[0], **other[1]))
                loss = 0.5 * loss + 0.5 * symmetric_ce(aug, teacher).mean()
            if self._replay is not None and self.source_weight > 0:
                batch = next(self._replay)
                src = self.logits(call_model(self.model, batch))
                loss = loss + self.source_weight * F.cross_entropy(src, batch_labels(batch))
            return loss

        self.update(loss_fn)
        with torch.no_grad():
            for n, p in self.named_adapted():
                self.teacher[n].mul_(self.ema).add_(p.detach(), alpha=1 - self.ema)
        return with_logits(output, (student.detach() + teacher).to(student.dtype))
