"""LoKr: the weight change as the Kronecker product of two small matrices.

Unified view: function = ``ΔW = s·W1 ⊗ W2`` with ``W1`` (a × c) and ``W2`` (b × d) where
``out = a·b`` and ``in = c·d`` are factorisations of the layer's sizes (near square roots, or with
one factor ``decompose_factor``); ``W2`` is itself low-rank ``W2a·W2b`` when ``r < max(b, d)/2``,
and so is ``W1`` with ``decompose_both``; ``s = alpha / r``. A full-rank change from a few hundred
parameters. Position = Linear / Conv1d / Conv2d layers (attention q/v by default); insertion =
parallel, ``h + x·ΔWᵀ`` (or the convolution with ``ΔW``). Foldable: merging adds ``ΔW``. ``W1``
starts at zero (LyCORIS's own init zeroes ``W2`` instead), so the model equals the base at init.

For convolutions ``W2`` carries the kernel (b × d × k1 × k2), is low-rank over the flattened
filter, or with ``use_effective_conv2d`` a CP form ``Σ T[i, j, k, l]·W2a[i, p]·W2b[j, q]``. The
products are reshaped to the base weight exactly as peft does (for Conv1d with a full ``W2`` that
is ``torch.kron`` of a 2-D and a 3-D factor, reshaped), so files are interchangeable with peft's
LoKr tuner.

Papers: Edalati et al., "KronA: Parameter Efficient Tuning with Kronecker Adapter", 2022,
https://arxiv.org/abs/2212.10650 · LyCORIS: Yeh et al., ICLR 2024, https://arxiv.org/abs/2309.14859
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..core.delta import Delta
from ..core.example import Example
from ..core.host import DeltaHost
from ..core.peft_layout import Option, PeftLayout
from ..core.spec import register
from ._lycoris import PEFT_FIXED, PEFT_OPTIONS, LycorisDelta, LycorisSpec, kaiming


def factorization(n: int, factor: int = -1) -> tuple[int, int]:
    """Split ``n = m·k``: ``(factor, n // factor)`` when ``factor`` divides ``n``; otherwise the
    divisor pair nearest the square root whose smaller side is at most ``factor`` (``-1``: no
    bound), smaller side first. The split LyCORIS and peft use, so shapes agree with their files."""
    if factor > 0 and n % factor == 0:
        return factor, n // factor
    bound = n if factor == -1 else factor
    m = 1
    for d in range(2, n + 1):  # walk up the divisors until the pair crosses the square root
        if m >= n // m:
            break
        if n % d:
            continue
        if d > bound:
            break
        m = d
    return min(m, n // m), max(m, n // m)


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product, ``a`` padded with leading 1-dims to ``b``'s rank as ``torch.kron`` pads
    it (so a 2-D ``W1`` and a 3-D Conv1d ``W2`` combine as in peft's files): per dimension,
    ``out[i·B + j] = a[i]·b[j]``. A broadcast product: ``torch.kron`` fails on some views with
    size-1 dims (peft's LoKr on Conv1d with use_effective_conv2d does)."""
    a = a.reshape((1,) * (b.dim() - a.dim()) + tuple(a.shape))
    spread_a = [s for n in a.shape for s in (n, 1)]  # (a0, 1, a1, 1, ...)
    spread_b = [s for n in b.shape for s in (1, n)]  # (1, b0, 1, b1, ...)
    out = a.reshape(spread_a) * b.reshape(spread_b)
    return out.reshape([m * n for m, n in zip(a.shape, b.shape, strict=True)])


@register
@dataclass(frozen=True)
class LoKr(LycorisSpec):
    """Low-rank Kronecker product adaptation (peft's ``LoKrConfig``). ``decompose_both`` also
    factors ``W1`` at rank ``r``; ``decompose_factor`` fixes one side of the size splits (-1: near
    the square root); ``rank_dropout_scale`` rescales the rows rank dropout keeps. ``init``:
    ``"identity"`` (peft's default: ``W1`` = 0), ``"lycoris"`` (``W2`` = 0) or ``"random"``
    (peft's ``init_weights=False``, for tests). The other options are :class:`LycorisSpec`'s."""

    method = "lokr"
    example = Example({"r": 2, "targets": ("fc1", "fc2")}, bad=(
        ({"r": 0}, "r"), ({"alpha": -1.0}, "alpha"), ({"rank_dropout": 1.0}, "rank_dropout"),
        ({"decompose_factor": 0}, "decompose_factor"), ({"init": "zeros"}, "init")))
    peft = PeftLayout("LOKR", fixed=PEFT_FIXED, options=(
        *PEFT_OPTIONS, Option("decompose_both", default=False),
        Option("decompose_factor", default=-1), Option("rank_dropout_scale", default=False),
    ), tensors=("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                "lokr_t2"))

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init: Literal["identity", "lycoris", "random"] = "identity"

    def validate(self) -> None:
        super().validate()
        f = self.decompose_factor
        if not isinstance(f, int) or isinstance(f, bool) or (f != -1 and f < 1):
            self.fail("decompose_factor",
                      "must be -1 (split near the square root) or a positive integer")

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        return LoKrDelta(self, host, module_name)


class LoKrDelta(LycorisDelta):
    """Factors ``lokr_w1`` (or ``lokr_w1_a``/``_b``) and ``lokr_w2`` (or ``lokr_w2_a``/``_b``, plus
    ``lokr_t2`` in CP form), as peft names them; which exist depends on r and the layer's sizes."""

    def __init__(self, spec: LoKr, host: DeltaHost, path: str) -> None:
        super().__init__(spec, host, path)
        self.rescale_rank_dropout = spec.rank_dropout_scale
        r, k = self.r, self.kernel
        a, b = factorization(self.out_dim, spec.decompose_factor)  # out = a·b
        c, d = factorization(self.in_dim, spec.decompose_factor)  # in/groups = c·d
        # a factor is kept whole when rank r would not be smaller than it (peft's rule)
        self.full_w1 = not (spec.decompose_both and r < max(a, c) / 2)
        self.full_w2 = r >= max(b, d) / 2
        if self.full_w1:
            self.lokr_w1 = self.new(a, c)
        else:
            self.lokr_w1_a, self.lokr_w1_b = self.new(a, r), self.new(r, c)
        if self.full_w2:
            self.lokr_w2 = self.new(b, d, *k)
        elif self.effective:  # CP: core (r, r, k1, k2), factors (r, b) and (r, d)
            self.lokr_t2 = self.new(r, r, *self.core_kernel)
            self.lokr_w2_a, self.lokr_w2_b = self.new(r, b), self.new(r, d)
        else:  # low-rank over the flattened filter: (b, r) @ (r, d·k1·k2)
            self.lokr_w2_a, self.lokr_w2_b = self.new(b, r), self.new(r, d * math.prod(k))
        for p in self.parameters():
            kaiming(p)
        if spec.init == "identity":  # W1 (or its A factor) = 0
            nn.init.zeros_(self.lokr_w1 if self.full_w1 else self.lokr_w1_a)
        elif spec.init == "lycoris":  # W2 (or its B factor) = 0
            nn.init.zeros_(self.lokr_w2 if self.full_w2 else self.lokr_w2_b)

    def raw_weight(self) -> torch.Tensor:
        w1 = self.lokr_w1 if self.full_w1 else self.lokr_w1_a @ self.lokr_w1_b  # (a, c)
        if self.full_w2:
            w2 = self.lokr_w2  # (b, d, *k)
        elif self.effective:  # (r, r, k1, k2), (r, b), (r, d) → (b, d, k1, k2)
            w2 = torch.einsum("ijkl,ip,jq->pqkl", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b  # (b, d·k1·k2)
        if w2.dim() == 4:  # conv kernels: w1 gets 1×1 kernel dims, so ⊗ keeps the kernel in W2
            w1 = w1[:, :, None, None]
        return kron(w1, w2)
