"""CoTTA: continual test-time adaptation with an EMA teacher and stochastic restore."""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .base import GradientTTA, register_method
from .batch import first_tensor, with_logits
from .errors import DeployError

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def image_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light per-sample augmentation of an image batch (N, C, H, W), in pure torch.

    Random rotation (±15°), scale (0.9-1.1), translation (±1/16 of the size), contrast (0.8-1.2) and
    brightness (±0.1 std) around each image's own statistics, plus slight Gaussian noise: CoTTA's
    augmentation set without flips (digits and text are not mirror-symmetric).
    """
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator).to(x.device, x.dtype) * (high - low) + low

    angle, scale = uniform(-math.pi / 12, math.pi / 12), uniform(0.9, 1.1)
    tx, ty = (
        uniform(-0.125, 0.125),
        uniform(-0.125, 0.125),
    )  # grid coordinates span 2, so 1/16 of the size
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1
    )  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    std = out.std(dim=(1, 2, 3), keepdim=True)
    contrast, bright = uniform(0.8, 1.2).view(n, 1, 1, 1), uniform(-0.1, 0.1).view(n, 1, 1, 1)
    out = (out - mean) * contrast + mean + bright * std
    noise = torch.randn(out.shape, generator=generator).to(x.device, x.dtype)
    return out + 0.01 * std * noise


@register_method
class CoTTA(GradientTTA):
    """CoTTA: a student learns from an exponential-moving-average teacher's (augmentation-averaged)
    predictions; a small random fraction of the adapted weights is restored to the source each step.

    Wang et al., "Continual Test-Time Domain Adaptation", CVPR 2022,
    https://arxiv.org/abs/2203.13591. The teacher and the anchor (source) models share the frozen
    weights with the student: only the adapted parameters are kept as extra copies and swapped in
    with ``torch.func.functional_call``. When the anchor's mean confidence is below
    ``anchor_threshold`` the teacher prediction is averaged over ``n_augment`` augmented copies
    (``augment(x, generator)``; default :func:`image_augment` for 4-D float inputs; for other inputs
    without ``augment`` the teacher's plain prediction is used). The paper adapts all parameters
    (``params="all"``) with Adam at lr 1e-3. Returns the teacher's output.
    """

    method: ClassVar[str] = "cotta"

    def __init__(
        self,
        model: nn.Module,
        *,
        ema: float = 0.999,
        restore_prob: float = 0.01,
        anchor_threshold: float = 0.92,
        n_augment: int = 32,
        augment: Augment | None = None,
        seed: int = 0,
        **common: Any,
    ) -> None:
        if not 0 <= ema <= 1:
            raise DeployError(
                f"cotta: ema={ema} must lie in [0, 1] (the teacher's weight on its old value)"
            )
        if not 0 <= restore_prob <= 1:
            raise DeployError(f"cotta: restore_prob={restore_prob} must lie in [0, 1]")
        if n_augment < 0:
            raise DeployError(
                f"cotta: n_augment={n_augment} must be >= 0 (0: no augmentation averaging)"
            )
        self.ema, self.restore_prob, self.anchor_threshold = ema, restore_prob, anchor_threshold
        self.n_augment, self.augment, self.seed = n_augment, augment, seed
        super().__init__(model, **common)
        self.reset_state()

    def reset_state(self) -> None:
        self.teacher = {n: t.clone() for n, t in self._source.items()}
        self.generator = torch.Generator().manual_seed(self.seed)

    def adapt_step(self, args: tuple, kwargs: dict) -> Any:
        student = self.logits(self.model(*args, **kwargs))
        with torch.no_grad():
            anchor = self.logits(functional_call(self.model, self._source, args, kwargs))
            teacher_out = functional_call(self.model, self.teacher, args, kwargs)
            teacher = self.logits(teacher_out)
            x = first_tensor(args, kwargs)
            is_image = x is not None and x.dim() == 4 and x.is_floating_point()
            aug = self.augment or (image_augment if is_image else None)
            unsure = anchor.softmax(-1).max(-1).values.mean() < self.anchor_threshold
            if aug is not None and self.n_augment and unsure:
                views = [
                    self._teacher_on(aug(x, self.generator), args, kwargs)
                    for _ in range(self.n_augment)
                ]
                teacher = torch.stack(views).mean(0)
                teacher_out = with_logits(teacher_out, teacher)
        target = teacher.softmax(-1)
        self.update(lambda: -(target * student.log_softmax(-1)).sum(-1).mean())
        with torch.no_grad():
            for n, p in self.named_adapted():
                self.teacher[n].mul_(self.ema).add_(p.detach(), alpha=1 - self.ema)
                if self.restore_prob > 0:
                    mask = (
                        torch.rand(p.shape, generator=self.generator).to(p.device)
                        < self.restore_prob
                    )
                    p.copy_(torch.where(mask, self._source[n], p))
        return teacher_out

    def _teacher_on(self, x_aug: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """Teacher logits with the batch tensor (the first tensor argument) replaced by
        ``x_aug``."""
        args = list(args)
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                args[i] = x_aug
                return self.logits(functional_call(self.model, self.teacher, tuple(args), kwargs))
        key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
        return self.logits(
            functional_call(self.model, self.teacher, tuple(args), {**kwargs, key: x_aug})
        )
