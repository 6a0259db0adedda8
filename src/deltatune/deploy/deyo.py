"""DeYO: entropy minimisation on samples whose prediction rests on the object's shape."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .base import GradientTTA, register_method
from .batch import softmax_entropy
from .entropy import margin_for
from .errors import DeployError
from .views import View, destroy_view


@register_method
class DeYO(GradientTTA):
    """DeYO: learn only from confident samples whose pseudo-label probability drops when the input's
    shape is destroyed (patches shuffled, words shuffled), weighted by certainty and by that drop.

    Lee et al., "Entropy is not Enough for Test-Time Adaptation: From the Perspective of
    Disentangled Factors", ICLR 2024, https://arxiv.org/abs/2403.07366. A sample is kept when its
    entropy is below ``e_filter * ln C`` and its PLPD, ``p(ŷ|x) - p(ŷ|x')`` with ``x'`` the
    destroyed view, exceeds ``plpd_threshold``; its entropy is weighted by
    ``exp(e_margin * ln C - H) + exp(PLPD)``. ``view`` replaces the default destruction
    (:func:`deltatune.deploy.views.destroy_view`); inputs it cannot destroy are adapted on the
    entropy filter alone.
    """

    method: ClassVar[str] = "deyo"

    def __init__(
        self,
        model: nn.Module,
        *,
        e_margin: float = 0.4,
        e_filter: float = 0.5,
        plpd_threshold: float = 0.2,
        view: View | None = None,
        seed: int = 0,
        **common: Any,
    ) -> None:
        for name, value in (("e_margin", e_margin), ("e_filter", e_filter)):
            if not 0 < value <= 1:
                raise DeployError(f"deyo: {name}={value} is a fraction of ln(classes) in (0, 1]")
        if not -1 <= plpd_threshold <= 1:
            raise DeployError(
                f"deyo: plpd_threshold={plpd_threshold} is a probability drop in [-1, 1]"
            )
        self.e_margin, self.e_filter, self.plpd_threshold = e_margin, e_filter, plpd_threshold
        self.view, self.seed = view or destroy_view, seed
        super().__init__(model, **common)
        self.reset_state()
        self.last_selected = 0

    def reset_state(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def adapt_step(self, args: tuple, kwargs: dict) -> Any:
        output = self.model(*args, **kwargs)
        self.update(lambda: self._loss(self.logits(output), args, kwargs))
        return output

    def _loss(self, logits: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
        c = logits.shape[-1]
        ent = softmax_entropy(logits)
        keep = (ent < margin_for(c, self.e_filter)).nonzero().squeeze(-1)
        plpd = torch.zeros_like(ent)
        destroyed = self.view(args, kwargs, self.generator) if keep.numel() else None
        if destroyed is not None:
            with torch.no_grad():
                probs = logits.detach().softmax(-1)
                other = self.logits(self.model(*destroyed[0], **destroyed[1])).softmax(-1)
                pseudo = probs.argmax(-1, keepdim=True)
                plpd = (probs.gather(1, pseudo) - other.gather(1, pseudo)).squeeze(1)
            keep = keep[plpd[keep] > self.plpd_threshold]
        self.last_selected = int(keep.numel())
        if keep.numel() == 0:
            return None
        e, d = ent[keep], plpd[keep]
        weight = torch.exp(margin_for(c, self.e_margin) - e.detach()) + torch.exp(d)
        return (e * weight).mean()
