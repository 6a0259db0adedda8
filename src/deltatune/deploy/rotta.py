"""RoTTA: robust BatchNorm statistics, a category-balanced memory of recent confident samples and a
mean teacher trained on that memory."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from .base import GradientTTA, register_method
from .batch import softmax_entropy
from .errors import DeployError
from .norm import BatchNormStats, StatsMode
from .views import Call, View, split_call, stack_calls, weak_view


@dataclass
class _Item:
    call: Call
    label: int
    uncertainty: float  # entropy / ln C
    age: int = 0


@register_method
class RoTTA(GradientTTA):
    """RoTTA: robust test-time adaptation in changing environments (correlated, non-i.i.d. streams).

    Yuan, Xie & Li, "Robust Test-Time Adaptation in Changing Environments", CVPR 2023,
    https://arxiv.org/abs/2303.13899. BatchNorm layers normalise with a running estimate of the test
    statistics (momentum ``bn_momentum``, from the source statistics), so a batch of one class does
    not become the normalisation. The teacher's pseudo-labels fill a category-balanced memory of
    ``capacity`` samples (CSTU: when full, the oldest and most uncertain sample of the most
    represented class makes room). Every ``update_every`` samples the student learns from the memory
    (its ``view``, default light image augmentation or word dropout) against the teacher's
    predictions, each sample weighted by its timeliness ``exp(-age/capacity) / (1 +
    exp(-age/capacity))``; the teacher follows the student with weight ``nu``. Returns the teacher's
    output.
    """

    method: ClassVar[str] = "rotta"
    bn_mode: ClassVar[StatsMode | None] = "ema"

    def __init__(
        self,
        model: nn.Module,
        *,
        capacity: int = 64,
        update_every: int = 64,
        nu: float = 0.001,
        bn_momentum: float = 0.05,
        view: View | None = None,
        seed: int = 0,
        **common: Any,
    ) -> None:
        if not (isinstance(capacity, int) and capacity >= 1):
            raise DeployError(f"rotta: capacity={capacity!r} must be a positive integer")
        if not (isinstance(update_every, int) and update_every >= 1):
            raise DeployError(f"rotta: update_every={update_every!r} must be a positive integer")
        if not 0 <= nu <= 1:
            raise DeployError(
                f"rotta: nu={nu} must lie in [0, 1] (the teacher's step to the student)"
            )
        if not 0 < bn_momentum <= 1:
            raise DeployError(f"rotta: bn_momentum={bn_momentum} must lie in (0, 1]")
        self.capacity, self.update_every, self.nu = capacity, update_every, nu
        self.bn_momentum, self.view, self.seed = bn_momentum, view or weak_view, seed
        super().__init__(model, **common)
        self.reset_state()

    def make_bn_stats(self) -> BatchNormStats:
        return BatchNormStats(self.model, "ema", momentum=self.bn_momentum)

    def reset_state(self) -> None:
        self.teacher = {n: t.clone() for n, t in self._source.items()}
        self.memory: list[_Item] = []
        self.seen = 0
        self.generator = torch.Generator().manual_seed(self.seed)

    def adapt_step(self, args: tuple, kwargs: dict) -> Any:
        with torch.no_grad():
            output = functional_call(self.model, self.teacher, args, kwargs)
            logits = self.logits(output).float()
        c = logits.shape[-1]
        unc = (softmax_entropy(logits) / math.log(c)).tolist()
        for call, label, u in zip(
            split_call(args, kwargs, logits.shape[0]), logits.argmax(-1).tolist(), unc
        ):
            self._add(_Item(call, label, u), c)
            self.seen += 1
            if self.seen % self.update_every == 0:
                self._learn()
        return output

    def _score(self, item: _Item) -> float:
        return 1 / (1 + math.exp(-item.age / self.capacity)) + item.uncertainty

    def _add(self, item: _Item, classes: int) -> None:
        for old in self.memory:
            old.age += 1
        counts = [0] * classes
        for m in self.memory:
            counts[m.label] += 1
        if len(self.memory) < self.capacity:
            self.memory.append(item)
            return
        share = self.capacity / classes
        if counts[item.label] < share:  # under-represented class: evict from the largest classes
            top = max(counts)
            pool = [i for i, m in enumerate(self.memory) if counts[m.label] == top]
        else:  # its own class is full enough: evict within it
            pool = [i for i, m in enumerate(self.memory) if m.label == item.label]
        worst = max(pool, key=lambda i: self._score(self.memory[i]))
        if self._score(self.memory[worst]) >= self._score(item):
            self.memory[worst] = item

    def _learn(self) -> None:
        if not self.memory:
            return
        args, kwargs = stack_calls([m.call for m in self.memory])
        ages = torch.tensor([m.age for m in self.memory], dtype=torch.float32)
        weight = torch.exp(-ages / self.capacity) / (1 + torch.exp(-ages / self.capacity))
        with torch.no_grad():
            target = self.logits(functional_call(self.model, self.teacher, args, kwargs)).softmax(
                -1
            )
        strong = self.view(args, kwargs, self.generator) or (args, kwargs)

        def loss_fn() -> torch.Tensor:
            student = self.logits(self.model(*strong[0], **strong[1]))
            ce = -(target * student.log_softmax(-1)).sum(-1)
            return (ce * weight.to(ce.device)).mean()

        self.update(loss_fn)
        with torch.no_grad():
            for n, p in self.named_adapted():
                self.teacher[n].mul_(1 - self.nu).add_(p.detach(), alpha=self.nu)
