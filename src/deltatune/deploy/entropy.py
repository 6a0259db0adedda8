"""Entropy-minimisation methods: Tent, EATA, SAR. All step through ``GradientTTA.update``."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .base import GradientTTA, register_method
from .batch import call_model, softmax_entropy
from .errors import DeployError


@register_method
class Tent(GradientTTA):
    """Tent: minimise the prediction entropy of each test batch by updating normalisation affine
    parameters (BatchNorm with batch statistics, LayerNorm, GroupNorm) or a named delta.

    Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021,
    https://arxiv.org/abs/2006.10726.
    """

    method: ClassVar[str] = "tent"

    def adapt_step(self, args: tuple, kwargs: dict) -> Any:
        output = self.model(*args, **kwargs)
        self.update(lambda: softmax_entropy(self.logits(output)).mean())
        return output


def margin_for(num_classes: int, fraction: float) -> float:
    """An entropy threshold as a fraction of the maximum entropy ``ln C`` (EATA/SAR use 0.4)."""
    return fraction * math.log(num_classes)


@register_method
class EATA(GradientTTA):
    """EATA: entropy minimisation on reliable, non-redundant samples, with a Fisher anti-forgetting
    term.

    Niu et al., "Efficient Test-Time Model Adaptation without Forgetting", ICML 2022,
    https://arxiv.org/abs/2204.02610. A sample is learned from when its entropy is below
    ``e_margin * ln C`` and its softmax has cosine similarity below ``d_margin`` with the running
    mean of earlier learned samples' softmax (the paper uses 0.05 for 1000 classes and 0.4 for 10
    classes); its loss is weighted by ``exp(e0 - entropy)``. With ``fisher_data`` (an iterable of
    source-like batches, labels not needed) the diagonal Fisher at the source weights is computed
    once and ``fisher_alpha * sum F (θ - θ0)²`` keeps important weights near the source; without it
    the method is the paper's ETA.
    """

    method: ClassVar[str] = "eata"

    def __init__(
        self,
        model: nn.Module,
        *,
        e_margin: float = 0.4,
        d_margin: float = 0.05,
        fisher_data: Iterable[Any] | None = None,
        fisher_alpha: float = 2000.0,
        **common: Any,
    ) -> None:
        if not 0 < e_margin <= 1:
            raise DeployError(f"eata: e_margin={e_margin} is a fraction of ln(classes) in (0, 1]")
        if not -1 <= d_margin <= 1:
            raise DeployError(f"eata: d_margin={d_margin} is a cosine-similarity bound in [-1, 1]")
        self.e_margin, self.d_margin, self.fisher_alpha = e_margin, d_margin, fisher_alpha
        super().__init__(model, **common)
        try:
            self.fisher = self.compute_fisher(fisher_data) if fisher_data is not None else None
        except Exception:
            self.remove(reset=True)
            raise
        self.mean_probs: torch.Tensor | None = None
        self.last_selected = 0  # samples learned from in the last batch (for monitoring)

    def compute_fisher(self, data: Iterable[Any]) -> dict[str, torch.Tensor]:
        """Diagonal Fisher of the pseudo-label cross-entropy at the source weights, averaged over
        batches."""
        fisher = {n: torch.zeros_like(p) for n, p in self.named_adapted()}
        batches = 0
        with torch.enable_grad():
            for batch in data:
                logits = self.logits(call_model(self.model, batch))
                loss = F.cross_entropy(logits, logits.argmax(-1).detach())
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for n, p in self.named_adapted():
                    if p.grad is not None:
                        fisher[n] += p.grad.detach() ** 2
                batches += 1
        self.optimizer.zero_grad(set_to_none=True)
        if batches == 0:
            raise DeployError(
                "eata: fisher_data yielded no batches; pass source-like batches or fisher_data=None"
            )
        return {n: f / batches for n, f in fisher.items()}

    def reset_state(self) -> None:
        self.mean_probs = None

    def adapt_step(self, args: tuple, kwargs: dict) -> Any:
        output = self.model(*args, **kwargs)
        self.update(lambda: self._loss(self.logits(output)))
        return output

    def _loss(self, logits: torch.Tensor) -> torch.Tensor | None:
        e0 = margin_for(logits.shape[-1], self.e_margin)
        ent = softmax_entropy(logits)
        reliable = ent < e0
        probs = logits[reliable].softmax(-1).detach()
        if self.mean_probs is not None and probs.shape[0]:
            novel = F.cosine_similarity(self.mean_probs[None], probs, dim=-1).abs() < self.d_margin
        else:
            novel = torch.ones(probs.shape[0], dtype=torch.bool, device=logits.device)
        keep = reliable.nonzero().squeeze(-1)[novel]
        self.last_selected = int(keep.numel())
        if keep.numel():
            new = probs[novel].mean(0)
            self.mean_probs = new if self.mean_probs is None else 0.9 * self.mean_probs + 0.1 * new
        if keep.numel() == 0:
            return None
        selected = ent[keep]
        loss = (selected * torch.exp(e0 - selected.detach())).mean()
        if self.fisher is not None:
            loss = loss + self.fisher_alpha * sum(
                (self.fisher[n] * (p - self._source[n]) ** 2).sum() for n, p in self.named_adapted()
            )
        return loss


@register_method
class SAR(GradientTTA):
    """SAR: sharpness-aware entropy minimisation on reliable samples, with model recovery.

    Niu et al., "Towards Stable Test-Time Adaptation in Dynamic Wild World", ICLR 2023,
    https://arxiv.org/abs/2302.12400. Samples with entropy above ``e_margin * ln C`` are dropped,
    the step is SAM with radius ``rho`` (the filter applied again at the perturbed weights), and
    when the moving average of the entropy falls below ``reset_constant`` (collapse to trivial
    confident predictions) the model is reset to the source.
    """

    method: ClassVar[str] = "sar"

    def __init__(
        self,
        model: nn.Module,
        *,
        e_margin: float = 0.4,
        rho: float = 0.05,
        reset_constant: float = 0.2,
        **common: Any,
    ) -> None:
        if not 0 < e_margin <= 1:
            raise DeployError(f"sar: e_margin={e_margin} is a fraction of ln(classes) in (0, 1]")
        if rho < 0:
            raise DeployError(
                f"sar: rho={rho} must be >= 0 (0 turns the SAM step into a plain step)"
            )
        self.e_margin, self.rho, self.reset_constant = e_margin, rho, reset_constant
        super().__init__(model, **common)
        self.ema: float | None = None
        self.recoveries = 0  # how often the model was reset to the source

    def reset_state(self) -> None:
        self.ema = None

    def adapt_step(self, args: tuple, kwargs: dict) -> Any:
        first: list[Any] = []

        def loss_fn() -> torch.Tensor | None:
            out = self.model(*args, **kwargs)
            if not first:
                first.append(out)
            logits = self.logits(out)
            ent = softmax_entropy(logits)
            ent = ent[ent < margin_for(logits.shape[-1], self.e_margin)]
            return ent.mean() if ent.numel() else None

        loss = self.update(loss_fn, rho=self.rho)
        if loss is not None:
            value = float(loss)
            self.ema = value if self.ema is None else 0.9 * self.ema + 0.1 * value
            if self.ema < self.reset_constant:
                self.reset()
                self.recoveries += 1
        return first[0]
