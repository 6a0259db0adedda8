"""T3A: the classifier head replaced by prototypes built from the test stream's own features."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import TTAWrapper, register_method
from .batch import last_linear, tap_input, with_logits
from .errors import DeployError


@register_method
class T3A(TTAWrapper):
    """T3A: classify by the nearest class prototype, built from confident test features.

    Iwasawa & Matsuo, "Test-Time Classifier Adjustment Module for Model-Agnostic Domain
    Generalization", NeurIPS 2021, https://proceedings.neurips.cc/paper/2021/hash/
    1415fe9fea0fa1e45dddcff5682239a0-Abstract.html. Each class starts with its head weight vector as
    its only support; every test feature (the input of ``layer``, the last ``nn.Linear`` by default,
    L2-normalised) joins the support of the class it is predicted as, and each class keeps its
    ``filter_k`` lowest-entropy supports. The logits are the features' dot products with the mean
    support of each class. No weight changes; needs no gradient.
    """

    method: ClassVar[str] = "t3a"

    def __init__(
        self, model: nn.Module, *, filter_k: int = 100, layer: str | None = None, **common: Any
    ) -> None:
        if not (isinstance(filter_k, int) and filter_k >= 1):
            raise DeployError(
                f"t3a: filter_k={filter_k!r} must be a positive integer (supports kept per class)"
            )
        self.filter_k = filter_k
        self.layer = layer if layer is not None else last_linear(model)
        head = dict(model.named_modules()).get(self.layer)
        if not isinstance(head, nn.Linear):
            raise DeployError(
                f"t3a: layer {self.layer!r} must be the model's nn.Linear classifier head; pass "
                "layer='module.name'"
            )
        super().__init__(model, **common)
        self.reset_state()

    @property
    def head(self) -> nn.Linear:
        return dict(self.model.named_modules())[self.layer]

    def reset_state(self) -> None:
        w = self.head.weight.detach()
        self.supports = F.normalize(w.float(), dim=-1)  # (C, D): one support per class to start
        self.labels = torch.arange(w.shape[0])
        self.entropies = torch.zeros(w.shape[0])  # the head's own vectors are kept first

    def forward_and_adapt(self, *args: Any, **kwargs: Any) -> Any:
        with tap_input(self.model, self.layer) as seen:
            output = self.model(*args, **kwargs)
        logits = self.logits(output)
        feats = F.normalize(seen[-1].float(), dim=-1)
        probs = logits.float().softmax(-1)
        ent = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
        self.supports = torch.cat([self.supports, feats.cpu()])
        self.labels = torch.cat([self.labels, probs.argmax(-1).cpu()])
        self.entropies = torch.cat([self.entropies, ent.cpu()])
        self._filter()
        c = self.head.weight.shape[0]
        onehot = F.one_hot(self.labels, c).float()  # (S, C)
        protos = F.normalize(self.supports.T @ onehot, dim=0)  # (D, C), class means up to scale
        return with_logits(output, (feats @ protos.to(feats.device)).to(logits.dtype))

    def _filter(self) -> None:
        keep = []
        for k in range(self.head.weight.shape[0]):
            idx = (self.labels == k).nonzero().squeeze(-1)
            order = torch.argsort(self.entropies[idx], stable=True)
            keep.append(idx[order[: self.filter_k]])
        idx = torch.cat(keep)
        self.supports, self.labels, self.entropies = (
            self.supports[idx],
            self.labels[idx],
            self.entropies[idx],
        )
