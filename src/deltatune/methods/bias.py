"""Additive bias deltas: Δh = b (broadcast over the output's channel dimension).

Shared by BitFit (:mod:`.bitfit`) and LoRA's ``bias="all"`` mode. Foldable: merging adds ``b`` to the
module's own bias. Paper (BitFit): https://arxiv.org/abs/2106.10199

Also home of the module selection shared by the whole-layer deltas (bias, norm, scale & shift).
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from ..core.delta import Delta
from ..core.errors import TargetError
from ..core.host import DeltaHost, module_kind
from ..core.spec import DeltaSpec
from ..core.targets import iter_candidates, name_matches

_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


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
        self.bias = nn.Parameter(torch.zeros(bias.shape, dtype=torch.float32 if not bias.is_floating_point() or bias.dtype in (torch.float16, torch.bfloat16) else bias.dtype))
        self._dim = channel_dim(host.base)

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        return h + broadcast(self.bias, h, self._dim).to(h.dtype)

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        return {"bias": self.bias.detach()}

    def to_peft(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        # peft trains the module's own bias in place and stores its full value.
        return {"bias": host.base.bias.detach() + self.bias.detach().to(host.base.bias.dtype)}

    def from_peft(self, host: DeltaHost, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"bias": (tensors["bias"].to(self.bias.dtype) - host.base.bias.detach().to(self.bias.dtype))}


# -- selection for whole-layer deltas (bias, norm, scale & shift) ---------------------------------
def _by_selectors(path: str, module: nn.Module, spec: DeltaSpec) -> bool:
    """The spec's ``targets``/``target_regex`` (either may match) and ``target_types`` (must match)."""
    by_name = None
    if spec.targets is not None or spec.target_regex is not None:
        by_name = any(name_matches(path, t) for t in spec.targets or ()) or (
            spec.target_regex is not None and re.fullmatch(spec.target_regex, path) is not None
        )
    by_type = None
    if spec.target_types:
        by_type = type(module).__name__ in spec.target_types or module_kind(module) in spec.target_types
    return bool(by_name if by_type is None else by_type if by_name is None else by_name and by_type)


def _within(path: str, pattern: str) -> bool:
    """``path`` is the module ``pattern`` names or lies inside it."""
    parts = path.split(".")
    return any(name_matches(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def select_modules(
    model: nn.Module, spec: DeltaSpec, accept: Callable[[nn.Module], bool], what: str
) -> list[str]:
    """Paths of the modules ``accept`` admits, narrowed by the spec's selectors when it has any.

    Whole-layer methods (BitFit, LN tuning, SSF) go everywhere they can by default, so unlike the
    suffix defaults of LoRA no selector means *every* admissible module. Modules kept trainable as a
    whole (``trainable_modules``) and everything inside them are left out.
    """
    narrowed = spec.targets is not None or spec.target_regex is not None or bool(spec.target_types)
    chosen = [
        path
        for path, module in iter_candidates(model)
        if accept(module)
        and (not narrowed or _by_selectors(path, module, spec))
        and not any(name_matches(path, e) for e in spec.exclude)
        and not any(_within(path, t) for t in spec.trainable_modules)
    ]
    for path, module in iter_candidates(model):  # a module named explicitly must be one it can host
        if any(name_matches(path, t) for t in spec.targets or ()) and not accept(module):
            raise TargetError(f"{type(spec).__name__} cannot host {path!r} ({type(module).__name__}): "
                              f"it needs a {what}; pick other targets")
    if not chosen:
        where = "among the selected modules" if narrowed else "in the model"
        raise TargetError(f"{type(spec).__name__} found no {what} {where}; pick targets that include some")
    return chosen
