"""Output-only adaptation: LAME (Laplacian adjustment) and EM prior correction for label shift.

Neither touches a weight: they re-weigh the model's predictions, so they work for any model
(BatchNorm or not), cannot drift, and need no gradient. The returned logits are log-probabilities
of the adjusted predictions (``softmax`` of them gives the adjusted probabilities).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import TTAWrapper, register_method
from .batch import last_linear, tap_input, with_logits
from .errors import DeployError


def knn_affinity(features: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 affinity to each sample's ``k`` nearest neighbours (itself excluded), (N, N)."""
    n = features.shape[0]
    dist = torch.cdist(features, features)
    k = min(k, n - 1)
    idx = dist.topk(k + 1, dim=-1, largest=False).indices[:, 1:]  # drop the sample itself
    return torch.zeros(n, n, dtype=features.dtype, device=features.device).scatter_(1, idx, 1.0)


def laplacian_adjust(
    probs: torch.Tensor,
    affinity: torch.Tensor,
    *,
    strength: float = 1.0,
    max_steps: int = 100,
    tol: float = 1e-8,
) -> torch.Tensor:
    """LAME's bound optimisation: ``z ∝ p · exp(strength · W z)`` iterated to a fixed point."""
    unary = -torch.log(probs + 1e-10)
    z = probs
    old = float("inf")
    for step in range(max_steps):
        pairwise = strength * affinity @ z
        z = torch.softmax(-unary + pairwise, dim=-1)
        energy = float((unary * z - pairwise * z + z * torch.log(z.clamp_min(1e-20))).sum())
        if step > 1 and abs(energy - old) <= tol * abs(old):
            break
        old = energy
    return z


@register_method
class LAME(TTAWrapper):
    """LAME: adjust each batch's predictions so that neighbours in feature space agree.

    Boudiaf et al., "Parameter-free Online Test-time Adaptation", CVPR 2022,
    https://arxiv.org/abs/2201.05718. Features are the (L2-normalised) input of ``layer`` (default:
    the last ``nn.Linear``, the classifier head's input; ``layer="logits"`` uses the logits). A
    batch of 1 has no neighbours: its prediction is returned unchanged.
    """

    method: ClassVar[str] = "lame"

    def __init__(
        self,
        model: nn.Module,
        *,
        knn: int = 5,
        strength: float = 1.0,
        layer: str | None = None,
        symmetric: bool = False,
        max_steps: int = 100,
        **common: Any,
    ) -> None:
        if knn < 1:
            raise DeployError(f"lame: knn={knn} must be at least 1")
        self.knn, self.strength, self.symmetric, self.max_steps = (
            knn,
            strength,
            symmetric,
            max_steps,
        )
        self.layer = (
            layer if layer is not None else ("logits" if _no_linear(model) else last_linear(model))
        )
        super().__init__(model, **common)

    def forward_and_adapt(self, *args: Any, **kwargs: Any) -> Any:
        if self.layer == "logits":
            output = self.model(*args, **kwargs)
            logits = self.logits(output)
            feats = logits
        else:
            with tap_input(self.model, self.layer) as seen:
                output = self.model(*args, **kwargs)
            logits = self.logits(output)
            feats = seen[-1]
        probs = logits.float().softmax(-1)
        if probs.shape[0] < 2:
            return output
        w = knn_affinity(F.normalize(feats.float(), dim=-1), self.knn)
        if self.symmetric:
            w = 0.5 * (w + w.T)
        z = laplacian_adjust(probs, w, strength=self.strength, max_steps=self.max_steps)
        return with_logits(output, torch.log(z.clamp_min(1e-20)).to(logits.dtype))


def _no_linear(model: nn.Module) -> bool:
    return not any(isinstance(m, nn.Linear) for m in model.modules())


SHIFT_ALPHA = 0.01
"""Default significance level of the prior-shift test that gates EM's correction."""


def check_shift_alpha(value: float, method: str) -> None:
    if not 0 <= value < 1:
        raise DeployError(
            f"{method}: shift_alpha={value} is a significance level in [0, 1) (0 always corrects)"
        )


def track_prior(owner: Any, probs: torch.Tensor, method: str, **em: Any) -> torch.Tensor:
    """Add a batch's source posteriors ``probs`` (N, C) to ``owner``'s window of recent ones
    (``owner.buffer``, at most ``owner.window`` rows), re-estimate the target prior over that window
    by EM into ``owner.prior``, and return the source prior it is measured against (``owner.
    source_prior``, uniform when unset) on ``probs``' device.

    The estimate replaces the source prior only where the likelihood-ratio test of
    :func:`prior_shift_pvalue` rejects "no prior change" at ``owner.shift_alpha`` (0: always):
    on in-domain data, or a window too small to tell, EM's estimate is sampling noise, and
    correcting by it turns right predictions near the decision boundary into wrong ones (measured
    on the airlines control of bench_tta_text.py). ``owner.shift_p`` keeps the test's p-value."""
    c = probs.shape[-1]
    source = owner.source_prior
    if source is None:
        source = torch.full((c,), 1.0 / c, dtype=torch.float64)
    if source.numel() != c:
        raise DeployError(
            f"{method}: source_prior has {source.numel()} classes but the model predicts {c}"
        )
    source = source.to(probs.device)
    seen = probs if owner.buffer is None else torch.cat([owner.buffer, probs])
    owner.buffer = seen[-owner.window :]
    prior = em_prior(owner.buffer, source, **em)
    alpha = getattr(owner, "shift_alpha", 0.0)
    owner.shift_p = prior_shift_pvalue(owner.buffer, source, prior)
    # no significant evidence of a prior change: keep the source prior, so that sampling noise in a
    # small window (or on in-domain data) is not "corrected" into errors
    owner.prior = prior if owner.shift_p <= alpha or alpha <= 0 else source.to(prior.dtype)
    return source


def prior_shift_pvalue(
    probs: torch.Tensor, source_prior: torch.Tensor, prior: torch.Tensor
) -> float:
    """p-value of the likelihood-ratio test "the target prior is the source prior" against the EM
    estimate ``prior`` (Saerens et al. 2002, section 2.3): twice the log-likelihood gain of the
    mixture ``sum_y p(y|x) prior_y / source_y`` over the samples, against a chi-square with C-1
    degrees of freedom. Small values: the class prior has changed; large: what EM found is within
    the sampling noise of ``len(probs)`` samples."""
    weights = prior.to(probs) / source_prior.to(probs)
    gain = torch.log((probs * weights).sum(-1).clamp_min(1e-300)).sum()
    stat = max(2.0 * float(gain), 0.0)
    dof = probs.shape[-1] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


def em_prior(
    probs: torch.Tensor, source_prior: torch.Tensor, *, max_iter: int = 100, tol: float = 1e-6
) -> torch.Tensor:
    """Target class prior by EM over source posteriors (Saerens et al. 2002), shape (C,)."""
    prior = source_prior.clone()
    for _ in range(max_iter):
        q = probs * (prior / source_prior)
        q = q / q.sum(-1, keepdim=True)
        new = q.mean(0)
        if (new - prior).abs().max() < tol:
            return new
        prior = new
    return prior


@register_method
class EMPrior(TTAWrapper):
    """Label-shift correction: estimate the target class prior by EM and re-weigh the posteriors,
    ``p_t(y|x) ∝ p_s(y|x) · π_t(y) / π_s(y)``.

    Saerens, Latinne & Decaestecker, "Adjusting the Outputs of a Classifier to New a Priori
    Probabilities: A Simple Procedure", Neural Computation 2002,
    https://doi.org/10.1162/089976602753284446. ``source_prior`` is the training label distribution
    (uniform when not given); the prior is estimated from the last ``window`` test samples
    (continual mode) or from the batch alone (episodic). Posteriors should be calibrated first
    (``temperature`` from :func:`deltatune.deploy.fit_temperature`).
    """

    method: ClassVar[str] = "em"

    def __init__(
        self,
        model: nn.Module,
        *,
        source_prior: Any = None,
        window: int = 1024,
        temperature: float = 1.0,
        max_iter: int = 100,
        shift_alpha: float = SHIFT_ALPHA,
        **common: Any,
    ) -> None:
        if window < 1:
            raise DeployError(f"em: window={window} must be at least 1 sample")
        check_shift_alpha(shift_alpha, "em")
        self.shift_alpha = shift_alpha
        if not temperature > 0:
            raise DeployError(f"em: temperature={temperature} must be positive")
        self.source_prior = None if source_prior is None else _as_prior(source_prior)
        self.window, self.temperature, self.max_iter = window, temperature, max_iter
        super().__init__(model, **common)
        self.reset_state()

    def reset_state(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.prior: torch.Tensor | None = None
        self.shift_p = 1.0

    def forward_and_adapt(self, *args: Any, **kwargs: Any) -> Any:
        output = self.model(*args, **kwargs)
        logits = self.logits(output)
        probs = (logits.double() / self.temperature).softmax(-1)
        source = track_prior(self, probs, "em", max_iter=self.max_iter)
        adjusted = probs * (self.prior / source)
        adjusted = adjusted / adjusted.sum(-1, keepdim=True)
        return with_logits(output, torch.log(adjusted.clamp_min(1e-300)).to(logits.dtype))


def _as_prior(value: Any) -> torch.Tensor:
    prior = torch.as_tensor(value, dtype=torch.float64).flatten()
    if (
        prior.numel() < 2
        or (prior < 0).any()
        or not torch.isfinite(prior).all()
        or prior.sum() <= 0
    ):
        raise DeployError(
            "em: source_prior must be non-negative class frequencies (one per class, not all zero)"
        )
    if (prior == 0).any():
        raise DeployError(
            "em: source_prior has a class with frequency 0; its target prior cannot be re-weighed"
        )
    return prior / prior.sum()
