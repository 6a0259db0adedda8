"""DeLoRA: a low-rank change whose strength is decoupled from its direction and bounded.

Unified view: function = ``ΔW = B·diag(λ / (r·‖aᵢ‖·‖bᵢ‖))·A·diag(‖W_:,j‖)``: each rank-one term
``bᵢ aᵢ`` is normalised (``aᵢ`` row of ``A``, ``bᵢ`` column of ``B``), so the trained scalar ``λ``
alone sets the change's size (``‖ΔW‖_F ≤ λ·max_j ‖W_:,j‖``), and the input columns are scaled by the
base weight's column norms ``‖W_:,j‖`` (captured once when the delta is built and stored beside it,
as peft's ``delora_w_norm``); position = a Linear layer (attention q/v by default); insertion =
parallel on the module's input, ``h + B·(s ⊙ A·(x ⊙ w_norm))``. ``B`` starts at zero, so the model
equals the base at init.

Foldable and exactly low-rank (rank ≤ r). Because the column norms are stored, not re-read, the
change does not depend on the current weight: merging adds ``ΔW`` and unmerging subtracts it.
Norms below 1e-4 are clamped, as in peft 0.21.2's ``delora`` tuner, whose math and tensor layout
(``delora_A``, ``delora_B``, ``delora_lambda``, ``delora_w_norm``) this follows.

Paper: Bini et al., "Decoupling Angles and Strength in Low-rank Adaptation" (DeLoRA), ICLR 2025,
https://arxiv.org/abs/2503.18225
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import Delta, Factor
from ..core.example import Example
from ..core.host import DeltaHost
from ..core.peft_layout import OFF, Option, PeftLayout, init_flag, linear_only
from ..core.spec import DeltaSpec, register
from ..core.targets import ATTENTION_QV

_TENSORS = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")


def _pattern_value(path: str, patterns: dict, default):
    """The value of the first key that matches the end of ``path`` as a regex (peft's rule: a module
    name, a dotted suffix, or a pattern such as ``layer\\.0\\..*query``)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


@register
@dataclass(frozen=True)
class DeLoRA(DeltaSpec):
    """Decoupled low-rank adaptation on Linear / GPT-2 Conv1D layers: rank ``r``, initial strength
    ``delora_lambda`` (trained), ``dropout`` on the input (peft's ``module_dropout``),
    ``rank_pattern``/``lambda_pattern`` (module name, suffix or regex → rank / strength), and
    ``init="random"`` (peft's ``init_weights=False``: ``B`` random too; for tests)."""

    method = "delora"
    example = Example({"r": 2, "targets": ("fc1", "fc2")}, bad=(
        ({"r": 0}, "r"), ({"delora_lambda": float("nan")}, "delora_lambda"),
        ({"dropout": -0.1}, "dropout"), ({"rank_pattern": {"fc1": 0}}, "rank_pattern"),
        ({"init": "zeros"}, "init")))
    host_kinds = ("linear",)
    default_targets = ATTENTION_QV
    factored = True
    peft = PeftLayout(
        "DELORA", tensors=_TENSORS, check=linear_only, fixed={**OFF, "init_weights": True},
        options=(Option("r", default=8), Option("delora_lambda", default=15),
                 Option("module_dropout", "dropout", 0.0), Option("rank_pattern", default={}),
                 Option("lambda_pattern", default={}),
                 init_flag("identity", "random", write=False)))

    r: int = 8
    delora_lambda: float = 15.0
    dropout: float = 0.0
    init: Literal["identity", "random"] = "identity"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    lambda_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            self.fail("r", "must be a positive integer (the rank)")
        if not math.isfinite(self.delora_lambda):
            self.fail("delora_lambda", "must be a finite number (the initial strength)")
        if not 0.0 <= self.dropout < 1.0:
            self.fail("dropout", "must be in [0, 1)")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                self.fail("rank_pattern", f"gives {key!r} rank {value!r}; ranks must be positive")
        for key, value in self.lambda_pattern.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                self.fail("lambda_pattern", f"gives {key!r} strength {value!r}; use finite numbers")

    def rank_for(self, path: str) -> int:
        return _pattern_value(path, self.rank_pattern, self.r)

    def lambda_for(self, path: str) -> float:
        return float(_pattern_value(path, self.lambda_pattern, self.delora_lambda))

    def check_host(self, host: DeltaHost, module_name: str) -> None:
        r, limit = self.rank_for(module_name), host.max_rank
        if limit is not None and r > limit:
            name = "r" if r == self.r else "rank_pattern"
            self.fail(name, f"gives rank {r} on {module_name!r}, above that layer's limit {limit} "
                      f"(min of its input and output sizes); use a rank <= {limit}")

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        return DeLoRADelta(self, host, module_name)


class DeLoRADelta(Delta):
    """Parameters ``delora_A`` (r, in), ``delora_B`` (out, r), ``delora_lambda`` (1,); buffer
    ``delora_w_norm`` (in,): the base weight's column norms when the delta was built."""

    foldable = True

    def __init__(self, spec: DeLoRA, host: DeltaHost, path: str) -> None:
        super().__init__(spec)
        self.fan_in_fan_out = host.fan_in_fan_out
        self.r = r = spec.rank_for(path)
        ref = host.weight
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        n_in, n_out = host.in_features, host.out_features
        self.delora_A = nn.Parameter(torch.empty(r, n_in, dtype=dtype, device=ref.device))
        self.delora_B = nn.Parameter(torch.zeros(n_out, r, dtype=dtype, device=ref.device))
        nn.init.kaiming_uniform_(self.delora_A, a=math.sqrt(5))
        if spec.init == "random":
            nn.init.kaiming_uniform_(self.delora_B, a=math.sqrt(5))
        strength = spec.lambda_for(path)
        self.delora_lambda = nn.Parameter(torch.full((1,), strength, dtype=dtype,
                                                     device=ref.device))
        with torch.no_grad():  # ‖W_:,j‖ per input feature j (Conv1D stores W as (in, out))
            w_norm = ref.detach().to(dtype).norm(dim=1 if self.fan_in_fan_out else 0)
        self.register_buffer("delora_w_norm", w_norm)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    def scale(self) -> torch.Tensor:
        """(r,) ``λ / (r·‖aᵢ‖·‖bᵢ‖)`` with both norms clamped at 1e-4."""
        a_norm = self.delora_A.norm(dim=1).clamp(min=1e-4)
        b_norm = self.delora_B.norm(dim=0).clamp(min=1e-4)
        return self.delora_lambda / self.r / (a_norm * b_norm)

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        xd = self.dropout(x.to(self.delora_A.dtype)) * self.delora_w_norm
        z = F.linear(xd, self.delora_A) * self.scale()  # (..., r)
        return h + F.linear(z, self.delora_B).to(h.dtype)

    def _a(self) -> torch.Tensor:
        """``diag(scale)·A·diag(w_norm)`` (r, in): the change is ``B`` times this."""
        return self.scale()[:, None] * self.delora_A * self.delora_w_norm

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        w = self.delora_B @ self._a()  # (out, in)
        return {"weight": (w.t() if self.fan_in_fan_out else w).detach()}

    def factors(self, host: DeltaHost) -> list[Factor] | None:
        return [Factor(self._a().detach(), self.delora_B.detach(), 1.0, bool(self.fan_in_fan_out))]
