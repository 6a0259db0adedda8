"""SSF: scale and shift the features after a layer, ``h' = γ ⊙ h + β``.

Unified view: function = a per-channel affine map; position = after every Linear / Conv1D / Conv and
norm layer (the paper inserts it after every operation) or the ones the selectors pick; insertion =
sequential on the layer's output. Foldable exactly into the layer it follows:
``W' = diag(γ)·W``, ``b' = γ ⊙ b + β`` (for a Linear/Conv without a bias, one is created on merge
and removed on unmerge; norm layers without a bias cannot absorb β and are refused).

Paper: Lian et al., "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning",
NeurIPS 2022, https://arxiv.org/abs/2210.08823
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..core.delta import Delta
from ..core.errors import TargetError
from ..core.example import Example
from ..core.host import DeltaHost, module_kind
from ..core.spec import DeltaSpec, register
from .bias import broadcast, channel_dim
from .lntuning import is_norm


def _foldable_host(module: nn.Module) -> bool:
    if module_kind(module) in ("linear", "conv"):
        return True
    return is_norm(module) and isinstance(getattr(module, "bias", None), nn.Parameter)


@register
@dataclass(frozen=True)
class SSF(DeltaSpec):
    """Scale & shift. ``init="identity"`` (γ = 1, β = 0: the model equals the base at init) or
    ``"normal"`` (the paper's γ ~ N(1, init_std), β ~ N(0, init_std))."""

    method = "ssf"
    example = Example(bad=(({"init": "uniform"}, "init"), ({"init_std": -1.0}, "init_std")))
    host_kinds = ("linear", "conv", "other")
    default_scope = "every"
    host_what = "Linear, Conv or norm layer"

    def can_host(self, module: nn.Module) -> bool:
        return _foldable_host(module)

    init: Literal["identity", "normal"] = "identity"
    init_std: float = 0.02

    def validate(self) -> None:
        if not self.init_std >= 0:
            self.fail("init_std", "must be >= 0")

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        if not _foldable_host(host.base):
            raise TargetError(
                f"SSF cannot fold into {module_name!r} ({type(host.base).__name__}): it needs a "
                "Linear, Conv or a norm layer with weight and bias; exclude it"
            )
        return SSFDelta(self, host)


class SSFDelta(Delta):
    """``γ ⊙ h + β`` along the output's channel dimension; merged as a row scaling of the weight."""

    foldable = True

    def __init__(self, spec: SSF, host: DeltaHost) -> None:
        super().__init__(spec)
        n = host.out_features if host.kind != "other" else host.base.weight.shape[0]
        ref = host.base.weight
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        self.scale = nn.Parameter(torch.ones(n, dtype=dtype, device=ref.device))
        self.shift = nn.Parameter(torch.zeros(n, dtype=dtype, device=ref.device))
        if spec.init == "normal":
            nn.init.normal_(self.scale, mean=1.0, std=spec.init_std)
            nn.init.normal_(self.shift, mean=0.0, std=spec.init_std)
        self._dim = channel_dim(host.base)
        self._created_bias = False

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        scale, shift = broadcast(self.scale, h, self._dim), broadcast(self.shift, h, self._dim)
        return (h * scale + shift).to(h.dtype)

    def _row_view(self, vec: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        """``vec`` shaped to scale the weight's output channels (rows; columns for GPT-2 Conv1D)."""
        w = host.base.weight
        if host.fan_in_fan_out:
            return vec.view(1, -1)
        return vec.view(-1, *([1] * (w.dim() - 1)))

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        gamma, beta = self.scale.detach(), self.shift.detach()
        w = host.base.weight.detach().to(gamma.dtype)
        bias = getattr(host.base, "bias", None)
        b = bias.detach().to(gamma.dtype) if bias is not None else torch.zeros_like(beta)
        return {"weight": w * self._row_view(gamma - 1, host), "bias": b * (gamma - 1) + beta}

    @torch.no_grad()
    def merge_into(self, host: DeltaHost) -> None:
        base = host.base
        base.weight.mul_(self._row_view(self.scale, host).to(base.weight.dtype))
        if base.bias is None:
            base.bias = nn.Parameter(
                self.shift.detach().to(base.weight.dtype).clone(), requires_grad=False
            )
            self._created_bias = True
        else:
            base.bias.mul_(self.scale.to(base.bias.dtype)).add_(self.shift.to(base.bias.dtype))

    @torch.no_grad()
    def unmerge_from(self, host: DeltaHost) -> None:
        base = host.base
        base.weight.div_(self._row_view(self.scale, host).to(base.weight.dtype))
        if self._created_bias:
            base.bias = None
            self._created_bias = False
        else:
            base.bias.sub_(self.shift.to(base.bias.dtype)).div_(self.scale.to(base.bias.dtype))
