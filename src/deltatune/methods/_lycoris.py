"""What the LyCORIS-style weight deltas (LoHa, LoKr) share: options, hosts and the delta skeleton.

Both build a dense weight change ``ΔW = s·f(factors)`` (``s = alpha / r``) in the base weight's
layout and add ``x·ΔWᵀ`` (or the convolution with ``ΔW``) to the layer's output: parallel
insertion, foldable, ``delta_weight`` exact. They differ only in ``f`` (a Hadamard or a Kronecker
product of small factors), which each method's file defines in ``raw_weight``.

Hosts are what peft's LyCORIS tuners take: ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (not
GPT-2's ``Conv1D``, ``Conv3d`` or embeddings). Files starting with ``_`` are not methods: nothing
here is registered.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import Delta
from ..core.host import DeltaHost
from ..core.peft_layout import Option
from ..core.spec import DeltaSpec
from ..core.targets import ATTENTION_QV

#: the peft config options LoHa and LoKr share (``init_weights`` is not read back: the file's
#: tensors are the adapter); the parameter names are peft's tensor suffixes
PEFT_OPTIONS = (
    Option("r", default=8), Option("alpha", default=8), Option("rank_dropout", default=0.0),
    Option("module_dropout", default=0.0), Option("use_effective_conv2d", default=False),
    Option("rank_pattern", default={}), Option("alpha_pattern", default={}),
)
#: what peft writes for what LoHa and LoKr do not model
PEFT_FIXED = {"exclude_modules": None, "init_weights": True, "layers_to_transform": None,
              "layers_pattern": None}


def pattern_value(path: str, patterns: dict[str, Any], default: Any) -> Any:
    """peft's per-module override: the first key ``k`` with ``(.*\\.)?(k)$`` matching ``path``
    (a name suffix or a regular expression), else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def kaiming(p: nn.Parameter) -> None:
    """LyCORIS's (and torch.nn.Linear's) default draw: Kaiming-uniform with a = √5."""
    nn.init.kaiming_uniform_(p, a=math.sqrt(5))


@dataclass(frozen=True)
class LycorisSpec(DeltaSpec):
    """Options LoHa and LoKr share (peft's ``LycorisConfig`` plus rank, alpha and dropouts).

    ``rank_pattern``/``alpha_pattern`` map a module name suffix or regex (matched as peft matches
    them) to that module's rank/alpha; ``rank_dropout`` zeroes random output rows of ``ΔW`` while
    training, ``module_dropout`` skips the whole delta for a step with that probability;
    ``use_effective_conv2d`` factors k×k convolution kernels through a small core tensor (CP form,
    FedPara's Proposition 3)."""

    host_what = "nn.Linear, nn.Conv1d or nn.Conv2d layers"
    default_targets = ATTENTION_QV

    r: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            self.fail("r", "must be a positive integer (the rank)")
        alpha = self.alpha
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            self.fail("alpha", "must be a finite number > 0 (the scale is alpha / r)")
        for name in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                self.fail(name, "must be in [0, 1)")
        for name, ok in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool)
                          and v >= 1), ("alpha_pattern", lambda v: isinstance(v, (int, float))
                                        and math.isfinite(v) and v > 0)):
            for key, value in getattr(self, name).items():
                try:
                    re.compile(key)
                except re.error as exc:
                    self.fail(name, f"has key {key!r}, not a valid regular expression ({exc})")
                if not ok(value):
                    self.fail(name, f"gives {key!r} the value {value!r}; it must be positive")

    def can_host(self, module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))

    def rank_for(self, path: str) -> int:
        return pattern_value(path, self.rank_pattern, self.r)

    def scaling_for(self, path: str) -> float:
        return float(pattern_value(path, self.alpha_pattern, self.alpha)) / self.rank_for(path)


class LycorisDelta(Delta):
    """``h + x·ΔWᵀ`` (or ``h + conv(x, ΔW)``) with ``ΔW = s·raw_weight()`` reshaped to the base
    weight's shape. Subclasses create their factors (named as peft names them, so the peft layout
    is the parameter names) and implement :meth:`raw_weight`."""

    foldable = True
    #: rank dropout divides the kept rows by their share (LoHa always; LoKr with rank_dropout_scale)
    rescale_rank_dropout: bool = True

    def __init__(self, spec: LycorisSpec, host: DeltaHost, path: str) -> None:
        super().__init__(spec)
        self.r = spec.rank_for(path)
        self.scaling = spec.scaling_for(path)
        ref = host.weight
        # half-precision bases get float32 factors; the change is cast at the boundary
        self._dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        self._device = ref.device
        base = host.base
        self.conv = host.kind == "conv"
        #: kernel size, () for Linear
        self.kernel: tuple[int, ...] = tuple(base.kernel_size) if self.conv else ()
        self.out_dim = host.out_features
        #: input features of one output's filter, without the kernel (in_channels / groups)
        self.in_dim = host.in_features // (base.groups if self.conv else 1)
        #: CP form for k×k kernels only (a 1×1 kernel is a Linear layer)
        self.effective = spec.use_effective_conv2d and any(k != 1 for k in self.kernel)

    @property
    def core_kernel(self) -> tuple[int, int]:
        """The CP core's kernel dims: Conv2d's (k1, k2), Conv1d's (k, 1) as peft stores it."""
        return (*self.kernel, 1)[:2] if len(self.kernel) == 1 else self.kernel

    def new(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(shape, dtype=self._dtype, device=self._device))

    def raw_weight(self) -> torch.Tensor:
        """The unscaled change, any shape with the base weight's number of elements."""
        raise NotImplementedError

    def weight_change(self, host: DeltaHost, dropout: bool = False) -> torch.Tensor:
        w = (self.raw_weight() * self.scaling).reshape(host.weight.shape)
        p = self.spec.rank_dropout
        if dropout and p > 0:  # drop random output rows of ΔW
            keep = (torch.rand(w.shape[0], device=w.device) > p).to(w.dtype)
            if self.rescale_rank_dropout:
                keep = keep / keep.mean().clamp_min(1.0 / w.shape[0])
            w = w * keep.view(-1, *[1] * (w.dim() - 1))
        return w

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        p = self.spec.module_dropout
        if self.training and p > 0 and float(torch.rand(())) <= p:  # skip the delta this step
            return h
        w = self.weight_change(host, dropout=self.training)
        xd = x.to(w.dtype)
        out = host.conv(xd, w) if self.conv else F.linear(xd, w)
        return h + out.to(h.dtype)

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        return {"weight": self.weight_change(host).detach()}
