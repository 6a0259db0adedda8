"""Factored (LoRA) weight changes, kept factored: concatenation and SVD re-factoring.

A LoRA's change ``s·B·A`` is exact and small in factored form. Summing LoRAs is exact by
concatenating their factors (rank adds up); re-factoring to a target rank uses thin QR of both
factors and an SVD of the small R×R core, never the dense ``out × in`` matrix.

- LoRA — Hu et al., https://arxiv.org/abs/2106.09685
- Merging LoRAs by concatenation / SVD, as in peft's ``add_weighted_adapter`` ("cat", "svd")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import MergeError


@dataclass(frozen=True)
class LowRank:
    """A weight change ``scale · B @ A`` (transposed when the base stores weights as (in, out):
    GPT-2 Conv1D, Embedding). ``A``: (r, in), ``B``: (out, r)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0
    transposed: bool = False

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise MergeError(
                f"LowRank needs A (r, in) and B (out, r); got A {tuple(self.A.shape)}, B "
                f"{tuple(self.B.shape)}"
            )

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> torch.Size:
        out, inp = self.B.shape[0], self.A.shape[1]
        return torch.Size((inp, out) if self.transposed else (out, inp))

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    def dense(self) -> torch.Tensor:
        w = (self.B @ self.A) * self.scale
        return w.T if self.transposed else w

    def scaled(self, factor: float) -> "LowRank":
        return LowRank(self.A, self.B, self.scale * float(factor), self.transposed)

    def __add__(self, other: "LowRank") -> "LowRank":
        return concat_lora([self, other])

    def to_rank(self, rank: int) -> "LowRank":
        return svd_lora([self], rank=rank)

    def numel(self) -> int:
        return self.A.numel() + self.B.numel()


def _check_same(factors: Sequence[LowRank]) -> None:
    if not factors:
        raise MergeError("no LoRA factors to merge")
    first = factors[0]
    for f in factors[1:]:
        if f.shape != first.shape or f.transposed != first.transposed:
            raise MergeError(
                f"LoRA factors of shapes {tuple(first.shape)} and {tuple(f.shape)} cannot be "
                "combined; they target different layers"
            )


def concat_lora(factors: Sequence[LowRank], weights: Sequence[float] | None = None) -> LowRank:
    """Exact Σ_k w_k·s_k·B_k·A_k as one LoRA of rank Σ r_k: stack the A's, scale and stack the
    B's."""
    _check_same(factors)
    weights = list(weights) if weights is not None else [1.0] * len(factors)
    a = torch.cat([f.A for f in factors], dim=0)  # (Σr, in)
    b = torch.cat([f.B * (w * f.scale) for f, w in zip(factors, weights)], dim=1)  # (out, Σr)
    return LowRank(a, b, 1.0, factors[0].transposed)


def svd_lora(
    factors: Sequence[LowRank], rank: int, weights: Sequence[float] | None = None
) -> LowRank:
    """The best rank-``rank`` approximation (Frobenius) of Σ_k w_k·s_k·B_k·A_k, in factored form.

    The singular values are split evenly (√S into each factor), the usual LoRA convention.
    """
    if not isinstance(rank, int) or rank < 1:
        raise MergeError(f"target rank must be a positive integer, got {rank!r}")
    cat = concat_lora(factors, weights)
    dtype = cat.A.dtype
    qb, rb = torch.linalg.qr(cat.B.double())  # B = Qb·Rb, Qb: (out, R)
    qa, ra = torch.linalg.qr(cat.A.double().T)  # Aᵀ = Qa·Ra, Qa: (in, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # the R×R core of B·A = Qb (Rb Raᵀ) Qaᵀ
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = (qb @ u[:, :r]) * root  # (out, r)
    a = root[:, None] * (vh[:r] @ qa.T)  # (r, in)
    return LowRank(a.to(dtype), b.to(dtype), 1.0, cat.transposed)
