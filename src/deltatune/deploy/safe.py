"""The safe default for test-time adaptation: label-shift correction first, entropy minimisation
only where it agrees with it, and a back-off when the updates drift away from it."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from .base import GradientTTA, OptimizerChoice, TTAWrapper, register_method
from .batch import with_logits
from .errors import DeployError
from .norm import BatchNormStats, StatsMode, norm_param_names
from .output import SHIFT_ALPHA, _as_prior, check_shift_alpha, track_prior


def _entropy(q: torch.Tensor) -> torch.Tensor:
    return -(q * torch.log(q.clamp_min(1e-12))).sum(-1)


@register_method
class Safe(GradientTTA):
    """Adapt without doing harm: EM label-shift correction, entropy minimisation of the *corrected*
    predictions on filtered samples, and a label-free guard that resets and halves the step size
    when
    the adapted model's predictions drift from the corrected reference.

    Why: entropy minimisation (Tent and its relatives) sharpens a model's bias towards its training
    majority class when the target's class prior differs (measured on tweets: Tent predicts 86% of
    apple tweets negative, against 33% true), while EM prior correction (Saerens et al. 2002) fixes
    exactly that and cannot drift. Each batch:

    1. a **reference** forward with the source weights (and, for BatchNorm models, a running
       estimate of the test statistics that starts at the source ones (worth ``source_batches``
       batches), averages the batches seen, then moves with momentum ``bn_momentum``: robust to
       batches of one class, as in RoTTA) gives calibrated posteriors (``temperature``); EM over the
       last ``window`` of them estimates the target prior ``π`` against ``source_prior``, used
       only where a likelihood-ratio test finds the prior changed (p ≤ ``shift_alpha``; otherwise
       ``π`` = ``source_prior``: no correction of in-domain sampling noise);
    2. the adapted model's posteriors are corrected by ``π / source_prior``; their entropy is
       minimised (weights: ``params``/``delta``, default the norm layers' affine parameters) only on
       samples that are confident (corrected entropy < ``e_margin * ln C``) and agree with the
       corrected reference (SAR/DeYO-style filtering against self-reinforced errors), so the
       objective no longer pushes towards the source majority class;
    3. the **guard** compares the class shares the adapted model predicts with the reference's on
       the same batch (total variation, smoothed over batches). Above ``max_drift``, or when the
       mean entropy falls below ``collapse`` times the reference's, the weights go back to the
       source and the learning rate is halved; after ``max_backoffs`` back-offs the weights stay at
       the source and only the correction remains. ``backoffs`` counts them.

    A model without normalisation layers (and no ``delta=``) gets the correction alone.

    The output is the corrected prediction of the adapted model (log-probabilities). Defaults were
    chosen on held-out validation streams, never on the benchmark's test labels
    (docs/deployment.md).
    """

    method: ClassVar[str] = "safe"
    bn_mode: ClassVar[StatsMode | None] = "ema"

    def __init__(
        self,
        model: nn.Module,
        *,
        source_prior: Any = None,
        temperature: float = 1.0,
        window: int = 1024,
        e_margin: float = 0.4,
        max_drift: float = 0.05,
        collapse: float = 0.5,
        max_backoffs: int = 3,
        bn_momentum: float = 0.1,
        source_batches: float = 0.25,
        optimizer: OptimizerChoice = "adam",
        lr: float = 1e-4,
        shift_alpha: float = SHIFT_ALPHA,
        **common: Any,
    ) -> None:
        check_shift_alpha(shift_alpha, "safe")
        self.shift_alpha = shift_alpha
        if window < 1:
            raise DeployError(f"safe: window={window} must be at least 1 sample")
        if not temperature > 0:
            raise DeployError(f"safe: temperature={temperature} must be positive")
        if not 0 < e_margin <= 1:
            raise DeployError(f"safe: e_margin={e_margin} is a fraction of ln(classes) in (0, 1]")
        if not 0 < max_drift <= 1:
            raise DeployError(f"safe: max_drift={max_drift} is a total-variation bound in (0, 1]")
        if not 0 <= collapse < 1:
            raise DeployError(f"safe: collapse={collapse} is an entropy ratio in [0, 1)")
        if not (isinstance(max_backoffs, int) and max_backoffs >= 0):
            raise DeployError(f"safe: max_backoffs={max_backoffs!r} must be an integer >= 0")
        if not 0 < bn_momentum <= 1:
            raise DeployError(f"safe: bn_momentum={bn_momentum} must lie in (0, 1]")
        try:
            self.source_prior = None if source_prior is None else _as_prior(source_prior)
        except DeployError as err:  # the shared check names EM; this is the safe method
            raise DeployError(str(err).replace("em:", "safe:", 1)) from None
        self.temperature, self.window, self.e_margin = temperature, window, e_margin
        self.max_drift, self.collapse, self.max_backoffs = max_drift, collapse, max_backoffs
        if not source_batches > 0:
            raise DeployError(f"safe: source_batches={source_batches} must be positive")
        self.bn_momentum, self.source_batches, self.base_lr = bn_momentum, source_batches, lr
        super().__init__(model, optimizer=optimizer, lr=lr, **common)
        self.reset_state()

    def configure(self) -> None:
        params, delta = self._choice
        if params == "norm" and delta is None and not norm_param_names(self.model):
            # nothing a norm-layer method could adapt: the correction alone, never an error
            TTAWrapper.configure(self)
            self.param_names = []
            for p in self.model.parameters():
                p.requires_grad_(False)
            return
        super().configure()

    def make_optimizer(self) -> torch.optim.Optimizer | None:  # type: ignore[override]
        return super().make_optimizer() if self.param_names else None

    def make_bn_stats(self) -> BatchNormStats:
        return BatchNormStats(
            self.model, "ema", momentum=self.bn_momentum, source_batches=self.source_batches
        )

    def reset_state(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.prior: torch.Tensor | None = None
        self.shift_p = 1.0
        self.drift = 0.0
        self.backoffs = 0
        self.frozen = not self.param_names
        if self.lr != self.base_lr:
            self.lr = self.base_lr
            self.optimizer = self.make_optimizer()

    def _posteriors(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.detach().double() / self.temperature).softmax(-1)

    def adapt_step(self, args: tuple, kwargs: dict) -> Any:
        output = self.model(*args, **kwargs)  # adapted weights; moves the BatchNorm estimate
        logits = self.logits(output)
        if self.bn_stats is not None:
            self.bn_stats.track = False
        try:
            with torch.no_grad():
                ref = self.logits(functional_call(self.model, self._source, args, kwargs))
        finally:
            if self.bn_stats is not None:
                self.bn_stats.track = True
        p_ref = self._posteriors(ref)
        source = track_prior(self, p_ref, "safe")
        ratio = (self.prior / source).float()
        q_ref = _normalise(p_ref.float() * ratio)
        q = _normalise((logits.float() / self.temperature).softmax(-1) * ratio)  # differentiable
        # a back-off puts the source weights back in place, so this batch's graph is stale: no step
        if not self._guard(q.detach(), q_ref) and not self.frozen:
            self.update(lambda: self._loss(q, q_ref))
        return with_logits(output, torch.log(q.detach().clamp_min(1e-20)).to(logits.dtype))

    def _loss(self, q: torch.Tensor, q_ref: torch.Tensor) -> torch.Tensor | None:
        e0 = self.e_margin * math.log(q.shape[-1])
        ent = _entropy(q)
        keep = (ent.detach() < e0) & (q.detach().argmax(-1) == q_ref.argmax(-1))
        if not keep.any():
            return None
        selected = ent[keep]
        return (selected * torch.exp(e0 - selected.detach())).mean()

    def _guard(self, q: torch.Tensor, q_ref: torch.Tensor) -> bool:
        """Back off when the adapted predictions leave the corrected reference's class shares;
        True when it did."""
        gap = 0.5 * float((q.mean(0) - q_ref.mean(0)).abs().sum())
        self.drift = 0.7 * self.drift + 0.3 * gap
        collapsed = float(_entropy(q).mean()) < self.collapse * float(_entropy(q_ref).mean())
        if self.frozen or not (self.drift > self.max_drift or collapsed):
            return False
        with torch.no_grad():
            for n, p in self.named_adapted():
                p.copy_(self._source[n])
        self.backoffs += 1
        self.drift = 0.0
        self.frozen = self.backoffs > self.max_backoffs
        self.lr = self.lr / 2
        self.optimizer = self.make_optimizer()  # type: ignore[assignment]
        return True


def _normalise(p: torch.Tensor) -> torch.Tensor:
    return p / p.sum(-1, keepdim=True)
