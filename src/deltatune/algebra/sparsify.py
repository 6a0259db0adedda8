"""Sparsification and sign consensus: the interchangeable parts of generalized task arithmetic.

A sparsifier looks at one task vector δ of one tensor, fits whatever whole-tensor statistic it needs
(a magnitude threshold, an L1 rescale factor, a random seed) with bounded-memory passes, and then
masks δ chunk by chunk. TIES, DARE, breadcrumbs and DELLA differ only in the sparsifier and whether
signs are elected (mergekit's "generalized task arithmetic" decomposition).

- magnitude (TIES trim) — Yadav et al., https://arxiv.org/abs/2306.01708
- random drop (DARE) — Yu et al., https://arxiv.org/abs/2311.03099
- magnitude with outliers removed (Model Breadcrumbs) — Davari & Belilovsky,
  https://arxiv.org/abs/2312.06795
- rank-dependent random drop (DELLA MagPrune) — Deep et al., https://arxiv.org/abs/2406.11617
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from . import tensors
from .errors import MergeError
from .tensors import chunk_generator, kth_largest, numel, reduce_rows

RowFn = Callable[[int, int], torch.Tensor]
Mask = Callable[[torch.Tensor, int, int], torch.Tensor]  # (δ rows, start, stop) -> mask of the rows
SparsifierName = Literal["magnitude", "random", "magnitude_outliers", "della"]

_EPS = 1e-7


@dataclass(frozen=True)
class Fitted:
    """A fitted sparsifier for one tensor: ``fitted(δ_rows, start, stop)`` → sparsified rows."""

    mask: Mask | None  # None: keep everything
    scale: float = 1.0
    zero: bool = False

    def __call__(self, delta: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if self.zero:
            return torch.zeros_like(delta)
        if self.mask is None:
            return delta
        mask = self.mask(delta, start, stop)
        kept = torch.where(mask, delta, 0) if mask.dtype == torch.bool else delta * mask
        return kept * self.scale if self.scale != 1.0 else kept


def fit_sparsifier(
    name: SparsifierName,
    shape: Sequence[int],
    delta: RowFn,
    density: float,
    *,
    rescale: bool = False,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    seed: int = 0,
    index: int = 0,
) -> Fitted:
    """Fit sparsifier ``name`` to the task vector rows ``delta(start, stop)`` of a ``shape`` tensor.

    ``rescale`` multiplies the kept entries so that the L1 norm is unchanged (as mergekit does; for
    DARE this equals the paper's 1/density in expectation). Random masks are regenerated per chunk
    from ``seed`` and ``index`` (the model's position), so fitting and applying see the same mask.
    """
    n = numel(shape)
    if density >= 1 or n == 0:  # nothing dropped (an empty tensor has nothing to drop)
        return Fitted(None)
    if name == "magnitude":
        if density <= 0 or n == 0:
            return Fitted(None, zero=True)
        k = max(1, int(density * n))
        tau = kth_largest(shape, lambda a, b: delta(a, b).abs(), k)
        mask: Mask = lambda d, a, b: d.abs() >= tau  # noqa: E731
    elif name == "magnitude_outliers":
        target, top = int(density * n), int(gamma * n)
        bottom = max(0, n - target - top)  # fewer outliers dropped when needed to keep the density
        if target <= 0:
            return Fitted(None, zero=True)
        lo = kth_largest(shape, lambda a, b: delta(a, b).abs(), n - bottom)
        hi = kth_largest(shape, lambda a, b: delta(a, b).abs(), n - bottom - target + 1)
        mask = lambda d, a, b: (d.abs() >= lo) & (d.abs() <= hi)  # noqa: E731
    elif name == "random":
        mask = lambda d, a, b: torch.bernoulli(  # noqa: E731
            torch.full_like(d, density), generator=chunk_generator(seed, index, a)
        )
    elif name == "della":
        if density <= 0:
            return Fitted(None, zero=True)
        if density + epsilon >= 1 or density - epsilon <= 0:
            raise MergeError(
                f"DELLA needs density ± epsilon inside (0, 1); got density={density}, "
                f"epsilon={epsilon}: lower epsilon"
            )
        mask = lambda d, a, b: _della_mask(  # noqa: E731
            d, density, epsilon, chunk_generator(seed, index, a)
        )
    else:
        raise MergeError(
            f"unknown sparsifier {name!r}; use magnitude, random, magnitude_outliers or della"
        )
    scale = 1.0
    if rescale:
        chunk = _chunk_for(name, shape)
        before = float(reduce_rows(shape, lambda a, b: delta(a, b).abs().sum(), chunk))
        after = float(
            reduce_rows(shape, lambda a, b: Fitted(mask)(delta(a, b), a, b).abs().sum(), chunk)
        )
        if before >= _EPS and after >= _EPS:
            scale = before / after
    return Fitted(mask, scale)


def _chunk_for(name: str, shape: Sequence[int]) -> int:
    # DELLA ranks magnitudes within a row, and a 1-D tensor is one row: never split it.
    chunk = tensors.CHUNK_ELEMENTS
    return max(chunk, numel(shape)) if name == "della" and len(shape) < 2 else chunk


def chunk_for(name: str | None, shape: Sequence[int]) -> int:
    """Row-block size a sparsifier needs for a tensor of ``shape``."""
    return _chunk_for(name or "", shape)


def _della_mask(
    delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator
) -> torch.Tensor:
    """Keep probability rises linearly with the magnitude rank inside each row (DELLA's
    MagPrune)."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(rows.dtype)  # 0 .. n−1 in every row
    n = rows.shape[1]
    norm = ranks / (n - 1) if n > 1 else torch.zeros_like(ranks)
    probs = (density - epsilon) + norm * 2 * epsilon
    return torch.bernoulli(probs, generator=generator).reshape(delta.shape)


def elect_signs(weighted: torch.Tensor, method: Literal["sum", "count"] = "sum") -> torch.Tensor:
    """TIES sign election over stacked weighted task vectors ``(K, ...)``: a boolean mask of the
    entries whose sign agrees with the elected one (``sum``: sign of the total mass, TIES;
    ``count``: majority vote). Zeros never agree, so they are left out of the disjoint mean."""
    sign = weighted.sign()
    if method == "sum":
        total = weighted.sum(dim=0)
    elif method == "count":
        total = sign.sum(dim=0)
    else:
        raise MergeError(f"unknown consensus {method!r}; use 'sum' or 'count'")
    elected = torch.where(total >= 0, 1.0, -1.0).to(sign.dtype)
    return sign == elected
