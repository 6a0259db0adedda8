"""ROID: certainty- and diversity-weighted soft likelihood ratio, weight ensembling with the source,
and adaptive prior correction of the outputs."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import GradientTTA, register_method
from .batch import softmax_entropy, with_logits
from .errors import DeployError
from .views import View, weak_view


def soft_likelihood_ratio(logits: torch.Tensor, clip: float = 0.99) -> torch.Tensor:
    """``-sum_c p_c log(p_c / (1 - p_c))`` per sample: unlike entropy its gradient does not vanish
    as a prediction becomes confident, so confident samples keep a bounded, steady pull."""
    probs = logits.softmax(-1).clamp(max=clip)
    return -(probs * torch.log(probs / (1 - probs) + 1e-6)).sum(-1)


@register_method
class ROID(GradientTTA):
    """ROID: universal test-time adaptation (continual, mixed domains, label shift, non-i.i.d.).

    Marsden, Döbler & Yang, "Universal Test-time Adaptation through Weight Ensembling, Diversity
    Weighting, and Prior Correction", WACV 2024, https://arxiv.org/abs/2306.00650. Each sample's
    soft
    likelihood ratio is weighted by its certainty ``exp(-H)`` times its diversity ``1 - cos(p,
    p̄)`` against the running mean prediction ``p̄`` (momentum ``prob_momentum``), so the classes the
    stream already predicts a lot pull less; with a ``view`` (default: light image augmentation or
    word dropout) a symmetric cross-entropy keeps the prediction consistent under it. After each
    step the adapted weights are averaged with the source, ``θ = α θ + (1 - α) θ0`` with ``α =
    ensemble``. The output is prior-corrected by the batch's own smoothed mean prediction.
    """

    method: ClassVar[str] = "roid"

    def __init__(
        self,
        model: nn.Module,
        *,
        ensemble: float = 0.99,
        prob_momentum: float = 0.9,
        prior_correction: bool = True,
        consistency: bool = True,
        view: View | None = None,
        seed: int = 0,
        **common: Any,
    ) -> None:
        for name, value in (("ensemble", ensemble), ("prob_momentum", prob_momentum)):
            if not 0 <= value <= 1:
                raise DeployError(f"roid: {name}={value} must lie in [0, 1]")
        self.ensemble, self.prob_momentum = ensemble, prob_momentum
        self.prior_correction, self.consistency = prior_correction, consistency
        self.view, self.seed = view or weak_view, seed
        super().__init__(model, **common)
        self.reset_state()

    def reset_state(self) -> None:
        self.mean_probs: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(self.seed)

    def adapt_step(self, args: tuple, kwargs: dict) -> Any:
        output = self.model(*args, **kwargs)
        logits = self.logits(output)
        self.update(lambda: self._loss(logits, args, kwargs))
        with torch.no_grad():
            if self.ensemble < 1:
                for n, p in self.named_adapted():
                    p.mul_(self.ensemble).add_(self._source[n], alpha=1 - self.ensemble)
        if not self.prior_correction:
            return output
        with torch.no_grad():
            probs = logits.detach().float().softmax(-1)
            n, c = probs.shape
            mean = probs.mean(0)
            smooth = max(1 / n, 1 / c) / mean.max()
            prior = (mean + smooth) / (1 + smooth * c)
            corrected = F.normalize(probs * prior, p=1, dim=-1)
        return with_logits(output, torch.log(corrected.clamp_min(1e-20)).to(logits.dtype))

    def _loss(self, logits: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        probs = logits.detach().softmax(-1)
        with torch.no_grad():
            if self.mean_probs is None:
                self.mean_probs = probs.mean(0)
            diversity = 1 - F.cosine_similarity(self.mean_probs[None], probs, dim=-1)
            weight = diversity * torch.exp(-softmax_entropy(logits.detach()))
            weight = weight / weight.sum().clamp_min(1e-8) * len(weight)
            self.mean_probs = self.prob_momentum * self.mean_probs + (
                1 - self.prob_momentum
            ) * probs.mean(0)
        loss = (soft_likelihood_ratio(logits) * weight).mean()
        other = self.view(args, kwargs, self.generator) if self.consistency else None
        if other is not None:
            aug = self.logits(self.model(*other[0], **other[1]))
            loss = loss + (symmetric_ce(aug, logits.detach()) * weight).mean()
        return loss


def symmetric_ce(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy between two predictions, per sample (RMT/ROID consistency)."""
    return -0.5 * (teacher.softmax(-1) * student.log_softmax(-1)).sum(-1) - 0.5 * (
        student.softmax(-1) * teacher.log_softmax(-1)
    ).sum(-1)
