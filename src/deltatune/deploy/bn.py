"""Gradient-free BatchNorm adaptation: re-estimated statistics (``bn``) and α-BN (``alpha_bn``)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from .base import TTAWrapper, register_method
from .errors import DeployError
from .norm import BatchNormStats, StatsMode, batchnorm_layers


class _StatsOnly(TTAWrapper):
    def check(self) -> None:
        if not batchnorm_layers(self.model):
            raise DeployError(
                f"{self.method}: the model has no BatchNorm layer whose statistics could be "
                "re-estimated; use 'tent' (LayerNorm/GroupNorm affine parameters) or an "
                "output-only method ('lame', 'em')"
            )

    def forward_and_adapt(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


@register_method
class BNAdapt(_StatsOnly):
    """BatchNorm re-estimation: normalise with statistics estimated on the test stream.

    ``momentum=1.0`` (default) normalises each batch with its own statistics: prediction-time BN
    (Nado et al. 2020, https://arxiv.org/abs/2006.10963; Schneider et al. 2020,
    https://arxiv.org/abs/2006.16971). ``momentum < 1`` keeps a running estimate that starts at the
    source statistics and moves towards the target, ``new = (1 - m) * old + m * batch``; in
    continual mode it carries across batches, which also serves batches of 1 for conv nets (their
    statistics are taken over the spatial positions).
    """

    method: ClassVar[str] = "bn"
    bn_mode: ClassVar[StatsMode | None] = "batch"

    def __init__(self, model: nn.Module, *, momentum: float = 1.0, **common: Any) -> None:
        if not 0.0 < momentum <= 1.0:
            raise DeployError(
                f"bn: momentum={momentum} must lie in (0, 1]; 1.0 uses each batch's own statistics"
            )
        self.momentum = momentum
        super().__init__(model, **common)

    def make_bn_stats(self) -> BatchNormStats:
        if self.momentum == 1.0:  # differentiable and cheaper: exactly train-mode normalisation
            return BatchNormStats(self.model, "batch")
        return BatchNormStats(self.model, "ema", momentum=self.momentum)


@register_method
class AlphaBN(_StatsOnly):
    """α-BN: normalise with ``alpha * source + (1 - alpha) * batch`` statistics.

    You et al. 2021, "Test-time batch statistics calibration for covariate shift",
    https://arxiv.org/abs/2110.04065. Mixing in the source statistics keeps small batches (even 1
    sample of a conv net: statistics over the spatial positions) from being normalised by noise.
    """

    method: ClassVar[str] = "alpha_bn"
    bn_mode: ClassVar[StatsMode | None] = "mix"

    def __init__(self, model: nn.Module, *, alpha: float = 0.1, **common: Any) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise DeployError(
                f"alpha_bn: alpha={alpha} must lie in [0, 1] (weight of the source statistics)"
            )
        self.alpha = alpha
        super().__init__(model, **common)

    def make_bn_stats(self) -> BatchNormStats:
        return BatchNormStats(self.model, "mix", alpha=self.alpha)
