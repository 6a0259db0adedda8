"""SHOT: source-free adaptation of the feature extractor against a frozen classifier head."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import GradientTTA, register_method
from .batch import last_linear, tap_input
from .errors import DeployError
from .params import ParamChoice


@register_method
class SHOT(GradientTTA):
    """SHOT: information maximisation (confident and diverse predictions) plus self-supervised
    pseudo-labels from feature-space class centroids; the classifier head stays frozen.

    Liang, Hu & Feng, "Do We Really Need to Access the Source Data? Source Hypothesis Transfer for
    Unsupervised Domain Adaptation", ICML 2020, https://arxiv.org/abs/2002.08546. Online, each
    batch:
    loss = mean entropy - ``diversity`` * entropy of the mean prediction + ``beta`` * cross-entropy
    to pseudo-labels from the nearest (cosine) centroid of the features (centroids weighted by the
    softmax, refined once by the labels they give, as in the paper). ``params="all"`` (default)
    adapts every parameter except the head (``layer``, the last ``nn.Linear``), the paper's
    feature extractor; ``params="norm"`` or ``delta=NAME`` restrict it.
    """

    method: ClassVar[str] = "shot"

    def __init__(
        self,
        model: nn.Module,
        *,
        beta: float = 0.3,
        diversity: float = 1.0,
        layer: str | None = None,
        params: ParamChoice = "all",
        **common: Any,
    ) -> None:
        if beta < 0 or diversity < 0:
            raise DeployError(f"shot: beta={beta} and diversity={diversity} must be >= 0")
        self.beta, self.diversity = beta, diversity
        self.layer = layer if layer is not None else last_linear(model)
        super().__init__(model, params=params, **common)

    def configure(self) -> None:
        super().configure()
        head = {
            f"{self.layer}.{n}"
            for n, _ in dict(self.model.named_modules())[self.layer].named_parameters()
        }
        self.param_names = [n for n in self.param_names if n not in head]
        if not self.param_names:
            raise DeployError(
                "shot: nothing left to adapt once the classifier head is frozen; use params='all' "
                "or a delta outside the head"
            )
        chosen = set(self.param_names)
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in chosen)

    def adapt_step(self, args: tuple, kwargs: dict) -> Any:
        with tap_input(self.model, self.layer) as seen:
            output = self.model(*args, **kwargs)
        self.update(lambda: self._loss(self.logits(output), seen[-1]))
        return output

    def _loss(self, logits: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(-1)
        ent = -(probs * logits.log_softmax(-1)).sum(-1).mean()
        mean = probs.mean(0)
        div = -(mean * torch.log(mean.clamp_min(1e-8))).sum()
        loss = ent - self.diversity * div
        if self.beta > 0:
            loss = loss + self.beta * F.cross_entropy(logits, self._pseudo(probs, feats))
        return loss

    @torch.no_grad()
    def _pseudo(self, probs: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        f = F.normalize(feats.detach().float(), dim=-1)
        weights = probs.detach().float()
        for _ in range(2):  # softmax-weighted centroids, then centroids of the labels they give
            centroids = F.normalize(weights.T @ f / (weights.sum(0)[:, None] + 1e-8), dim=-1)
            labels = (f @ centroids.T).argmax(-1)
            weights = F.one_hot(labels, probs.shape[-1]).float()
        return labels
