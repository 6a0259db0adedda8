"""Compacter: bottleneck adapters whose projections are parameterised hypercomplex multiplication
(PHM) layers.

A PHM layer's weight is a sum of Kronecker products, ``W = Σ_{i=1..n} A_i ⊗ B_i``, with ``A_i``
small ``n×n`` "slow" rules shared by every adapter layer of the delta and ``B_i`` per-layer "fast"
weights, themselves rank-``k`` products ``s_i t_iᵀ`` (Compacter's low-rank PHM). A ``d_in×d_out``
projection then costs about ``k·(d_in + d_out)`` parameters instead of ``d_in·d_out``.
Positions, styles, scaling and zero-init of the up-projection are those of
:class:`~deltatune.methods.bottleneck.Bottleneck`.

Paper: Karimi Mahabadi et al., https://arxiv.org/abs/2106.04647
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.example import Example
from ..core.spec import register
from .bottleneck import Bottleneck


class PHMRule(nn.Module):
    """The ``n`` slow ``n×n`` matrices ``A_i``; one instance serves many :class:`PHMLinear`."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.rule = nn.Parameter(torch.randn(n, n, n, dtype=dtype, device=device) / math.sqrt(n))


class PHMLinear(nn.Module):
    """``y = x·W + b`` with ``W = Σ_i A_i ⊗ B_i`` (``B_i = left_i·right_i`` when factorised)."""

    def __init__(
        self, d_in: int, d_out: int, rule: PHMRule, *, rank: int, factorized: bool, zero: bool,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        super().__init__()
        n = rule.rule.shape[0]
        self.n, self.d_in, self.d_out = n, d_in, d_out
        self.rules = rule
        p, q = d_in // n, d_out // n
        target_std = math.sqrt(2.0 / (d_in + d_out))  # Xavier scale of the full weight
        if factorized:
            # var(W) = n · var(A) · rank · var(left) · var(right) = rank · σ⁴ with var(A) = 1/n
            sigma = (target_std**2 / rank) ** 0.25
            self.left = nn.Parameter(torch.randn(n, p, rank, dtype=dtype, device=device) * sigma)
            right = torch.zeros(n, rank, q, dtype=dtype, device=device)
            self.right = nn.Parameter(right if zero else torch.randn_like(right) * sigma)
            self.fast = None
        else:
            fast = torch.zeros(n, p, q, dtype=dtype, device=device)
            self.fast = nn.Parameter(fast if zero else torch.randn_like(fast) * target_std)
            self.left = self.right = None
        self.bias = nn.Parameter(torch.zeros(d_out, dtype=dtype, device=device))

    def weight(self) -> torch.Tensor:
        fast = self.fast if self.fast is not None else self.left @ self.right  # (n, p, q)
        a = self.rules.rule  # (n, n, n)
        # kron(A_i, B_i)[a·p + c, b·q + d] = A_i[a, b]·B_i[c, d]; summed over i
        w = torch.einsum("iab,icd->acbd", a, fast)  # (n, p, n, q)
        return w.reshape(self.d_in, self.d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight() + self.bias


@register
@dataclass(frozen=True)
class Compacter(Bottleneck):
    """Compacter adapter: ``phm_dim`` = n (must divide the adapter's widths), ``phm_rank`` = rank of
    the fast weights (``factorized``), ``shared_rules``: share the slow rules across layers."""

    method = "compacter"
    example = Example(dict(reduction_factor=2), model="transformer", merges=False,
                      bad=(({"phm_dim": 1}, "phm_dim"), ({"phm_rank": 0}, "phm_rank")))

    phm_dim: int = 4
    phm_rank: int = 1
    factorized: bool = True
    shared_rules: bool = True

    def validate(self) -> None:
        super().validate()
        if isinstance(self.phm_dim, bool) or not isinstance(self.phm_dim, int) or self.phm_dim < 2:
            self.fail("phm_dim", "must be an integer >= 2 (the number of Kronecker summands)")
        rank = self.phm_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            self.fail("phm_rank", "must be a positive integer")

    def bottleneck_width(self, d_in: int) -> int:
        # PHM needs widths divisible by n: round the bottleneck down to a multiple of n (>= n).
        width = super().bottleneck_width(d_in)
        return max(self.phm_dim, width // self.phm_dim * self.phm_dim)

    def shared_state(self, model: nn.Module, paths: list[str]) -> dict[str, PHMRule]:
        # Filled on first use (then the dtype and device of the base are known); one rule per
        # direction, shared by every layer's down (resp. up) projection.
        return {}

    def make_projection(self, d_in, d_out, *, zero, which, shared, dtype, device) -> nn.Module:
        n = self.phm_dim
        if d_in % n or d_out % n:
            self.fail("phm_dim", f"must divide the adapter widths ({d_in} -> {d_out})")
        if self.shared_rules:
            rule = shared.setdefault(which, PHMRule(n, dtype, device))
        else:
            rule = PHMRule(n, dtype, device)
        return PHMLinear(d_in, d_out, rule, rank=self.phm_rank, factorized=self.factorized,
                         zero=zero, dtype=dtype, device=device)
