"""ZSCL-style continual learning: distillation on a reference set plus a weight ensemble.

Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of Vision-Language
Models", https://arxiv.org/abs/2303.06628.
"""

from __future__ import annotations

import copy
import random

import torch
from torch import nn

from .base import Strategy, _Penalty, _trainable, distillation_loss
from .streams import ContinualError


class _WeightEnsemble:
    def __init__(self, strategy: "ZSCL", t: int) -> None:
        self.s, self.t = strategy, t

    def on_train_start(self, model) -> None:
        self.s.we_start(include_start=self.t > 0)

    def on_step_end(self, model, step) -> None:
        if step % self.s.we_interval == 0:
            self.s.we_add()

    def on_train_end(self, model) -> None:
        self.s.we_finish()


class ZSCL(Strategy):
    """Distillation from the previous model on a *reference* set plus a weight ensemble (ZSCL).

    From the second task on, each step adds λ·T²·KL(teacher ‖ student) on a batch of reference
    inputs (``reference``: any data spec, e.g. ``tweet-sentiment:other``; its labels are never used;
    by default the current task's inputs). Every ``we_interval`` steps the trainable tensors are
    folded into a running mean that starts from the task's initial weights (from the second task
    on); the mean replaces the weights at the end of the task, so each task moves the model only
    part of the way.

    λ = 0.3 was chosen on the mnist-corruptions validation stream (issue 22: λ = 1, 0.3, 0.1 gave
    32.9%, 43.8%, 43.5% average accuracy, sequential 38.5%): at λ = 1 the distillation, on top of
    the weight ensemble's halving of each task's move, kept the model from learning a new domain."""

    name = "zscl"
    mask_old_classes = True  # the paper's CLIP classifies a task over that task's class names

    @classmethod
    def options(cls):
        return {
            "lam": 0.3,
            "temperature": 2.0,
            "reference": None,
            "reference_size": 512,
            "reference_batch": 16,
            "we_interval": 10,
            "seed": 0,
        }

    teacher: nn.Module | None = None

    def validate(self, spec) -> None:
        if not isinstance(self.we_interval, int) or self.we_interval < 1:
            raise ContinualError(
                f"zscl we_interval must be a positive number of steps, got {self.we_interval!r}"
            )
        if self.reference_batch < 1 or self.reference_size < 1:
            raise ContinualError("zscl reference_batch and reference_size must be positive")

    def setup(self, model, spec, head, collate) -> None:
        super().setup(model, spec, head, collate)
        self.rng = random.Random(self.seed)
        self.pool: list = []
        if self.reference is not None:
            from ..data import load_data

            ref = load_data(str(self.reference), "train", seed=self.seed, limit=self.reference_size)
            self.pool = [{k: v for k, v in e.items() if k != "label"} for e in ref.examples]
            try:
                collate(self.pool[:2])
            except Exception as exc:  # noqa: BLE001 - the model's collate names what it needs
                raise ContinualError(
                    f"zscl reference {self.reference!r} does not fit this model's inputs ({exc}); "
                    "use data of the same kind as the stream"
                ) from None

    def before_task(self, t, task) -> None:
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False) if t > 0 else None
        self.old = list(self.seen)
        self._inputs = self.pool or [
            {k: v for k, v in e.items() if k != "label"} for e in task.train.examples
        ]

    def distillation(self, model, batch=None, outputs=None) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        device = next(model.parameters()).device
        ref = self.collate(
            self.rng.sample(self._inputs, min(self.reference_batch, len(self._inputs)))
        )
        ref = {
            k: v.to(device) if torch.is_tensor(v) else v for k, v in ref.items() if k != "labels"
        }
        student = self.model(**ref)  # unmasked: the old classes are what is distilled
        with torch.no_grad():
            target = self.teacher(**ref)
        return distillation_loss(student, target, self.old, self.temperature, self.lam)

    @torch.no_grad()
    def we_start(self, include_start: bool) -> None:
        params = _trainable(self.model)
        self._mean = {n: p.detach().clone() for n, p in params.items()} if include_start else None
        self._count = 1 if include_start else 0

    @torch.no_grad()
    def we_add(self) -> None:
        params = _trainable(self.model)
        if self._mean is None:
            self._mean, self._count = {n: p.detach().clone() for n, p in params.items()}, 1
            return
        self._count += 1
        for n, m in self._mean.items():
            m.add_(params[n].detach() - m, alpha=1.0 / self._count)

    @torch.no_grad()
    def we_finish(self) -> None:
        if self._mean is None:
            return
        params = _trainable(self.model)
        self.we_add()  # the final weights count too
        for n, m in self._mean.items():
            params[n].copy_(m)
        self._mean = None

    def callbacks(self, t, task):
        return [_Penalty(self.distillation), _WeightEnsemble(self, t)]
