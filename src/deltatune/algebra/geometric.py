"""Merges that use the geometry of the weights: SLERP and Model Stock.

Both need a whole-tensor statistic (norms, a dot product, an angle); it is accumulated over row
blocks first, then the output is produced block by block, so memory stays bounded.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .errors import MergeError
from .registry import UNIT, common_shape, merge_method
from .tensors import map_rows, read_rows, reduce_rows, work_dtype


def slerp_coefficients(
    norm0: float, norm1: float, dot: float, t: float, threshold: float = 0.9995, eps: float = 1e-8
) -> tuple[float, float]:
    """Coefficients (c0, c1) with slerp(v0, v1) = c0·v0 + c1·v1, from the norms and raw dot product.

    Nearly collinear (or antipodal) inputs, ``|cos| > threshold``, fall back to linear
    interpolation.
    """
    n0 = norm0 if norm0 > eps else 1.0
    n1 = norm1 if norm1 > eps else 1.0
    cos = max(-1.0, min(1.0, dot / (n0 * n1)))
    if abs(cos) > threshold:
        return 1.0 - t, t
    theta = math.acos(cos)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


@merge_method(
    "slerp",
    paper="https://dl.acm.org/doi/10.1145/325165.325242",
    needs_base=True,
    min_models=1,
    max_models=1,
    shared_params={"t": 0.5},
    mergekit=True,
    limits={"t": UNIT},
)
def slerp(base, models, *, t=0.5, out=None):
    """Spherical interpolation from the base (t = 0) to the other model (t = 1) (Shoemake, 1985)."""
    shape = common_shape(base, models)
    (other,) = models
    wd = work_dtype(base.dtype, other.dtype)
    stats = reduce_rows(
        shape, lambda a, b: _norms_and_dot(read_rows(base, a, b, wd), read_rows(other, a, b, wd))
    )
    c0, c1 = slerp_coefficients(math.sqrt(stats[0]), math.sqrt(stats[1]), float(stats[2]), float(t))
    return map_rows(
        shape,
        base.dtype,
        lambda a, b: c0 * read_rows(base, a, b, wd) + c1 * read_rows(other, a, b, wd),
        out,
    )


def _norms_and_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x.double(), y.double()
    return torch.stack([(x * x).sum(), (y * y).sum(), (x * y).sum()])


@merge_method(
    "model_stock",
    paper="https://arxiv.org/abs/2403.19522",
    needs_base=True,
    min_models=2,
    shared_params={"filter_wise": False},
    mergekit=True,
)
def model_stock(base, models, *, filter_wise=False, out=None):
    """Model Stock: move the fine-tuned average toward the base by the angle between task vectors
    (Jang et al.)."""
    shape = common_shape(base, models)
    if len(models) < 2:
        raise MergeError("model_stock needs at least two fine-tuned models besides the base")
    wd = work_dtype(base.dtype, *(m.dtype for m in models))

    def offsets(a: int, b: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        w0 = read_rows(base, a, b, wd)
        return w0, [read_rows(m, a, b, wd) - w0 for m in models]

    if filter_wise:  # one ratio per output row (a 1-D tensor is one row)
        def block(a: int, b: int) -> torch.Tensor:
            w0, offs = offsets(a, b)
            rows = [o.reshape(1, -1) if o.dim() < 2 else o.reshape(o.shape[0], -1) for o in offs]
            ratio = _stock_ratio(rows, dim=1).unsqueeze(-1)  # (rows, 1)
            avg = sum(rows) / len(rows)
            flat0 = w0.reshape(avg.shape)
            return (ratio * (avg + flat0) + (1 - ratio) * flat0).reshape(w0.shape)

        chunk = None if len(shape) >= 2 else max(1, math.prod(shape))
        return map_rows(shape, base.dtype, block, out, chunk)

    k = len(models)

    def gram(a: int, b: int) -> torch.Tensor:
        _, offs = offsets(a, b)
        flat = torch.stack([o.reshape(-1).double() for o in offs])
        return flat @ flat.T  # (K, K): squared norms on the diagonal, dots off it

    g = reduce_rows(shape, gram)
    norms = g.diagonal().sqrt()
    cos = [
        (g[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(k)
        for j in range(i + 1, k)
    ]
    ratio = float(_ratio_from_cos(torch.stack(cos).mean(), k))

    def block(a: int, b: int) -> torch.Tensor:
        w0, offs = offsets(a, b)
        return w0 + ratio * (sum(offs) / k)

    return map_rows(shape, base.dtype, block, out)


def _stock_ratio(offsets: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    k = len(offsets)
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            norm = offsets[i].norm(dim=dim) * offsets[j].norm(dim=dim)
            cos.append(((offsets[i] * offsets[j]).sum(dim=dim) / norm.clamp(min=1e-6)).clamp(-1, 1))
    return _ratio_from_cos(torch.stack(cos).mean(dim=0), k)


def _ratio_from_cos(cos: torch.Tensor, k: int) -> torch.Tensor:
    """t = k·cos / (1 + (k−1)·cos); at the singularity keep the base (t = 0)."""
    denom = 1 + (k - 1) * cos
    singular = denom.abs() < 1e-6
    return torch.where(
        singular,
        torch.zeros_like(cos),
        k * cos / torch.where(singular, torch.ones_like(denom), denom),
    )
