"""LN tuning: train the weight and bias of the normalisation layers (peft's ``LN_TUNING``).

Unified view: function = a change ``(Δw, Δb)`` of a layer's own affine parameters; position = every
norm layer (LayerNorm, RMSNorm, BatchNorm, GroupNorm, ...) by default, or any layer with a weight
the selectors pick (peft allows that too: it is then full tuning of that layer); insertion = on the
weights, ``h' = f(x; w + Δw, b + Δb)``. Foldable and exactly additive: merging adds ``Δw``/``Δb``.
The deltas start at zero, so the model equals the base at init.

Paper: Zhao et al., "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning",
ICLR 2024, https://arxiv.org/abs/2312.11420 (the idea goes back to tuning only normalisation
parameters, e.g. Frankle et al., https://arxiv.org/abs/2003.00152)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from ..core.delta import Delta
from ..core.errors import TargetError
from ..core.example import Example
from ..core.host import DeltaHost, Host
from ..core.peft_layout import PeftLayout, PeftTensor
from ..core.spec import DeltaSpec, register

_TORCH_NORMS = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)
# Layers whose output is linear in (weight, bias): f(x; w + Δw, b + Δb) = f(x; w, b) + f(x; Δw, Δb),
# so the change of the output is one call with the deltas as parameters.
_LINEAR_IN_PARAMS = (*_TORCH_NORMS, nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer with a learnable per-channel weight (torch's, or e.g.
    ``LlamaRMSNorm``)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return False
    return isinstance(module, _TORCH_NORMS) or type(module).__name__.endswith("Norm")


def _has_weight(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), nn.Parameter)


def _full(name: str) -> Callable[[Delta, Host, torch.Tensor], torch.Tensor]:
    """The trained layer's parameter ``name`` (what peft stores) from the delta's change."""
    def full(delta: Delta, host: Host, change: torch.Tensor) -> torch.Tensor:
        base = getattr(host.base, name).detach()
        return base + change.to(base.dtype)
    return full


def _change(name: str) -> Callable[[Delta, Host, torch.Tensor], torch.Tensor]:
    """The delta's change of parameter ``name`` from peft's trained copy."""
    def change(delta: Delta, host: Host, full: torch.Tensor) -> torch.Tensor:
        mine = getattr(delta, name)
        return full.to(mine.dtype) - getattr(host.base, name).detach().to(mine.dtype)
    return change


@register
@dataclass(frozen=True)
class LNTuning(DeltaSpec):
    """Norm-layer tuning. With no selector every norm layer trains; ``targets`` may also name other
    layers with weights (they are then tuned whole, as peft's LN_TUNING does)."""

    method = "ln_tuning"
    example = Example(bad=(({"target_regex": "(["}, "target_regex"),))
    host_kinds = ("linear", "conv", "embedding", "other")
    # peft's LN_TUNING stores a full trained copy of the layer: its tensors are base + delta
    peft = PeftLayout("LN_TUNING", fixed={"exclude_modules": None}, refuse={}, tensors=tuple(
        PeftTensor(n, f"ln_tuning_layers.{n}", save=_full(n), load=_change(n))
        for n in ("weight", "bias")))

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        if not _has_weight(host.base):
            raise TargetError(f"LNTuning needs a layer with a weight at {module_name!r} "
                              f"({type(host.base).__name__}); pick a norm layer")
        return NormDelta(self, host)

    # every norm layer by default; selectors may also name other layers with a weight
    default_scope = "every"

    def can_host(self, module: nn.Module) -> bool:
        return _has_weight(module)

    def hosts_by_default(self, module: nn.Module) -> bool:
        return is_norm(module)

    def hosts_what(self, default: bool = False) -> str:
        return "norm layer" if default else "layer with a weight"


class NormDelta(Delta):
    """Trainable changes ``weight``/``bias`` of a layer's own parameters (the originals stay
    untouched)."""

    foldable = True

    def __init__(self, spec: DeltaSpec, host: DeltaHost) -> None:
        super().__init__(spec)
        base = host.base
        self._names = [
            n for n in ("weight", "bias") if isinstance(getattr(base, n, None), nn.Parameter)
        ]
        for n in self._names:
            ref = getattr(base, n)
            dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
            self.register_parameter(
                n, nn.Parameter(torch.zeros(ref.shape, dtype=dtype, device=ref.device))
            )
        self._linear = isinstance(base, _LINEAR_IN_PARAMS) or type(base).__name__ == "Conv1D"

    @staticmethod
    def _call(base: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if base.training:  # BatchNorm updates its running statistics in place: let it update copies
            params = {**params, **{n: b.clone() for n, b in base.named_buffers(recurse=False)}}
        return functional_call(base, params, (x,))

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        base = host.base
        deltas = {n: getattr(self, n).to(getattr(base, n).dtype) for n in self._names}
        if self._linear:
            return h + self._call(base, deltas, x)
        # Any other layer: the difference of two calls (e.g. Gemma's RMSNorm scales by 1 + w).
        moved = {n: getattr(base, n) + d for n, d in deltas.items()}
        return h + (self._call(base, moved, x) - self._call(base, {}, x))

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n).detach() for n in self._names}
