"""QA-LoRA: a LoRA whose weight change is constant over each quantization group of inputs, so it
merges into a 4-bit base exactly.

Unified view: function = low-rank ``B·A`` applied to the input *pooled over groups* of
``group_size`` consecutive features (``A`` has ``in / group_size`` columns); position = Linear
layers (the LoRA targets); insertion = parallel, ``h + s·B·A·pool(x)``; scaling ``s = alpha / r``.
Written as a weight change, ``ΔW[:, k] = s·(B·A)[:, k // g] · (in / g) / g``: every column of a
group gets the same value. An asymmetric 4-bit format stores ``w = scale·q + minimum`` per group
(deltatune's int4, GGUF Q4_1), so a change that is constant over the group folds into ``minimum``
without touching a code: ``dt.merge(model, requantize=True)`` does that, where a plain LoRA's change
must be re-rounded (measured on SmolLM2: exact match 60% → 0%, bench/RESULTS.md).

Pooling follows peft's ``use_qalora`` (``mean over the group × in / group_size``), so the factors
have peft's shapes. The price is expressiveness: ``A`` sees ``in / g`` pooled features, not ``in``
(at g = 64 on a 576-wide layer, 9): docs/quantization.md has the measured task figure.

Paper: Xu et al., "QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models",
ICLR 2024, https://arxiv.org/abs/2309.14717
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import Delta, Factor
from ..core.example import Example
from ..core.host import DeltaHost
from ..core.quantized import QuantizedBase
from ..core.spec import DeltaSpec, register
from ..core.targets import ATTENTION_QV
from .lora import check_rank_alpha_dropout

#: the group when neither the spec nor a quantized base says (deltatune's int4 default)
DEFAULT_GROUP = 64


@register
@dataclass(frozen=True)
class QALoRA(DeltaSpec):
    """LoRA on group-pooled inputs (QA-LoRA). ``group_size=None`` takes the quantized base's own
    group (int4: its ``group_size``; GGUF: 32), or 64 on a float base."""

    method = "qalora"
    example = Example(dict(r=2, group_size=4, targets=("fc1", "fc2")),
                      bad=(({"r": 0}, "r"), ({"group_size": 0}, "group_size")))
    host_kinds = ("linear",)
    default_targets = ATTENTION_QV
    factored = True

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    group_size: int | None = None

    def validate(self) -> None:
        check_rank_alpha_dropout(self)
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            self.fail("group_size", "must be a positive integer (inputs pooled together), or "
                      "None for the quantized base's own group")

    def group_for(self, host: DeltaHost) -> int:
        if self.group_size is not None:
            return self.group_size
        base = host.base
        if isinstance(base, QuantizedBase) and base.offset_group:
            return base.offset_group
        return DEFAULT_GROUP

    def check_host(self, host: DeltaHost, module_name: str) -> None:
        g, n = self.group_for(host), host.in_features
        if n % g:
            self.fail("group_size", f"(group {g}) does not divide {module_name!r}'s {n} inputs; "
                      f"use a divisor of {n} (the base's quantization group for an exact merge)")
        limit = min(n // g, host.out_features)
        if self.r > limit:
            self.fail("r", f"exceeds {module_name!r}'s limit {limit} ({n} inputs pooled in groups "
                      f"of {g}); use a rank <= {limit} or a smaller group")
        base = host.base
        offset = base.offset_group if isinstance(base, QuantizedBase) else None
        if offset and g % offset:
            self.fail("group_size", f"(group {g}) is not a multiple of {module_name!r}'s "
                      f"quantization group {offset} ({base.format}): the change would not merge "
                      f"exactly; use {offset} or a multiple of it")

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        if host.fan_in_fan_out:
            self.fail("targets", f"{module_name!r} stores its weight transposed (GPT-2 Conv1D); "
                      "QA-LoRA supports nn.Linear layers")
        return QALoRADelta(self, host)


class QALoRADelta(Delta):
    """``h + s·B(A(pool(dropout(x))))``; foldable (the change is group-constant)."""

    foldable = True

    def __init__(self, spec: QALoRA, host: DeltaHost) -> None:
        super().__init__(spec)
        self.r, self.group = spec.r, spec.group_for(host)
        self.scaling = spec.alpha / spec.r
        self.pooled = host.in_features // self.group
        ref = host.weight
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Parameter(torch.empty(self.r, self.pooled, dtype=dtype, device=ref.device))
        self.lora_B = nn.Parameter(torch.zeros(host.out_features, self.r, dtype=dtype,
                                               device=ref.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) → (..., in / g): the group means times the number of groups (peft's form)."""
        g = x.reshape(*x.shape[:-1], self.pooled, self.group).mean(-1)
        return g * self.pooled

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        xd = x.to(self.lora_A.dtype)
        if self.dropout is not None:
            xd = self.dropout(xd)
        y = F.linear(F.linear(self.pool(xd), self.lora_A), self.lora_B) * self.scaling
        return h + y.to(h.dtype)

    def expanded_A(self) -> torch.Tensor:
        """``A`` as a full-width (r, in) factor: each pooled column repeated over its group, with
        the pooling's weight ``(in / g) / g``."""
        return self.lora_A.repeat_interleave(self.group, dim=1) * (self.pooled / self.group)

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        return {"weight": (self.lora_B @ self.expanded_A()).detach() * self.scaling}

    def factors(self, host: DeltaHost) -> list[Factor] | None:
        return [Factor(self.expanded_A().detach(), self.lora_B.detach(), float(self.scaling),
                       False)]
