"""Additive bias deltas: Δh = b (broadcast over the output's channel dimension).

Shared by BitFit (:mod:`.bitfit`) and LoRA's ``bias="all"`` mode. Foldable: merging adds ``b`` to
the module's own bias. Paper (BitFit): https://arxiv.org/abs/2106.10199
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.delta import Delta
from ..core.host import DeltaHost

_CHANNEL_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def channel_dim(module: nn.Module) -> int:
    """Which output dimension a module's bias runs along: 1 for conv/BN-like layers, else last."""
    return 1 if isinstance(module, _CHANNEL_FIRST) else -1


def broadcast(vec: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    if dim == -1 or like.dim() <= 2:
        return vec
    shape = [1] * like.dim()
    shape[dim] = -1
    return vec.view(shape)


class BiasDelta(Delta):
    """Trains a shift of an existing bias, leaving the original bias tensor untouched."""

    foldable = True

    def __init__(self, spec, host: DeltaHost) -> None:
        super().__init__(spec)
        bias = host.base.bias
        self.bias = nn.Parameter(
            torch.zeros(
                bias.shape,
                dtype=torch.float32
                if not bias.is_floating_point() or bias.dtype in (torch.float16, torch.bfloat16)
                else bias.dtype,
            )
        )
        self._dim = channel_dim(host.base)

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        return h + broadcast(self.bias, h, self._dim).to(h.dtype)

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        return {"bias": self.bias.detach()}
