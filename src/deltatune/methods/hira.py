"""HiRA: a high-rank change made as the Hadamard product of the frozen weight and a low-rank matrix.

Unified view: function = ``ΔW = W ⊙ (B·A)`` with ``A`` (r, in) and ``B`` (out, r) trained and ``W``
the layer's frozen weight, so the change inherits the rank of ``W`` (high) while it trains only
``r·(in + out)`` numbers; position = Linear / GPT-2 Conv1D layers (attention query/value by
default); insertion = parallel on the module's input, ``h + x·(W ⊙ BA)ᵀ``. ``B`` starts at zero, so
the model equals the base at init.

Foldable, but not low-rank (no ``factors``), and the change depends on the weight it multiplies:
merging writes ``W ← W ⊙ (1 + BA)`` and unmerging divides by ``1 + BA`` again (exact up to float
rounding; a merge is refused where ``1 + BA`` is near zero, since no division could undo it).
``delta_weight`` is the change relative to the current (unmerged) weight. The math and tensor layout
(``hira_A``, ``hira_B``) follow peft 0.21.2's ``hira`` tuner.

Paper: Huang et al., "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language
Models", ICLR 2025, https://openreview.net/forum?id=TwJrTz9cRS (on OpenReview only, no arXiv
version). The unified view: He et al., ICLR 2022, https://arxiv.org/abs/2110.04366
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import Delta
from ..core.errors import StateError
from ..core.example import Example
from ..core.host import DeltaHost
from ..core.peft_layout import Option, PeftLayout
from ..core.spec import DeltaSpec, register
from ..core.targets import ATTENTION_QV
from .delora import _pattern_value


def _one_rank(spec: DeltaSpec, deltas: dict[str, Delta]) -> str:
    if any(d.r != spec.r for d in deltas.values()):
        return ("peft 0.21.2's HiRA ignores rank_pattern (every layer gets rank r), so it could "
                "not load this adapter")
    return ""


@register
@dataclass(frozen=True)
class HiRA(DeltaSpec):
    """Hadamard high-rank adaptation on Linear / GPT-2 Conv1D layers: rank ``r`` of the matrix
    multiplied into the weight (per module through ``rank_pattern``: name, suffix or regex → rank),
    ``dropout`` on the input; ``init`` = ``"identity"`` (``A`` Kaiming-uniform, ``B`` zero: the
    base model), ``"gaussian"`` (``A`` ~ N(0, 1/r²), ``B`` zero) or ``"random"`` (both N(0, 1),
    peft's ``init_weights=False``; for tests)."""

    method = "hira"
    example = Example(
        {"r": 2, "targets": ("fc1", "fc2")},
        bad=(
            ({"r": 0}, "r"),
            ({"dropout": 1.0}, "dropout"),
            ({"rank_pattern": {"fc1": 0}}, "rank_pattern"),
            ({"init": "zeros"}, "init"),
        ),
    )
    default_targets = ATTENTION_QV
    host_what = "Linear / GPT-2 Conv1D modules"
    peft = PeftLayout(
        "HIRA", tensors=("hira_A", "hira_B"), fan_in_fan_out=True, check=_one_rank,
        options=(Option("r", default=32), Option("hira_dropout", "dropout", 0.0),
                 # peft 0.21.2 builds every layer at rank r whatever its rank_pattern says
                 Option("rank_pattern", read=False),
                 Option("init_weights", "init", True, choices=(
                     ("identity", True), ("gaussian", "gaussian"), ("random", False)))))

    r: int = 32
    dropout: float = 0.0
    init: Literal["identity", "gaussian", "random"] = "identity"
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            self.fail("r", "must be a positive integer (rank of the matrix multiplied into W)")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            self.fail("dropout", "must be in [0, 1)")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                self.fail("rank_pattern", f"gives {key!r} rank {value!r}; ranks must be positive")

    def rank_for(self, path: str) -> int:
        return _pattern_value(path, self.rank_pattern, self.r)

    def check_host(self, host: DeltaHost, module_name: str) -> None:
        r, limit = self.rank_for(module_name), host.max_rank
        if limit is not None and r > limit:
            name = "r" if r == self.r else "rank_pattern"
            self.fail(name, f"gives rank {r} on {module_name!r}, above that layer's limit {limit} "
                      f"(min of its input and output sizes); use a rank <= {limit}")

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        return HiRADelta(self, host, self.rank_for(module_name))


class HiRADelta(Delta):
    """Parameters ``hira_A`` (r, in) and ``hira_B`` (out, r), float32 on half-precision bases."""

    foldable = True

    def __init__(self, spec: HiRA, host: DeltaHost, r: int) -> None:
        super().__init__(spec)
        self.fan_in_fan_out, self.r = host.fan_in_fan_out, r
        ref = host.weight
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        a = torch.empty(r, host.in_features, dtype=dtype, device=ref.device)
        b = torch.zeros(host.out_features, r, dtype=dtype, device=ref.device)
        if spec.init == "identity":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif spec.init == "gaussian":
            nn.init.normal_(a, std=1 / r)
        else:
            nn.init.normal_(a)
            nn.init.normal_(b)
        self.hira_A, self.hira_B = nn.Parameter(a), nn.Parameter(b)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    def _w(self, host: DeltaHost) -> torch.Tensor:
        """The host's weight as (out, in) in the delta's dtype."""
        w = host.weight.t() if self.fan_in_fan_out else host.weight
        return w.to(self.hira_A.dtype)

    def _mask(self) -> torch.Tensor:
        return self.hira_B @ self.hira_A  # (out, in): multiplies W entry by entry

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        xd = self.dropout(x.to(self.hira_A.dtype))
        return h + F.linear(xd, self._w(host) * self._mask()).to(h.dtype)

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        w = (self._w(host) * self._mask()).detach()
        return {"weight": w.t() if self.fan_in_fan_out else w}

    def _factor(self) -> torch.Tensor:
        """``1 + BA`` in the base's layout: the merged weight is the base weight times this."""
        m = 1 + self._mask().detach()
        return m.t() if self.fan_in_fan_out else m

    @torch.no_grad()
    def merge_into(self, host: DeltaHost) -> None:
        factor = self._factor()
        if factor.abs().min().item() < 1e-6:
            raise StateError("HiRA cannot be merged exactly: 1 + B·A is zero at some weight entry, "
                             "so unmerging could not restore it; keep it unmerged")
        w = host.weight
        w.copy_((w.to(factor.dtype) * factor).to(w.dtype))

    @torch.no_grad()
    def unmerge_from(self, host: DeltaHost) -> None:
        w = host.weight
        w.copy_((w.to(self.hira_A.dtype) / self._factor()).to(w.dtype))
