"""Row-chunked access to tensors, so a merge never holds more than a few chunks of any one tensor.

Every merge method reads its inputs through :func:`read_rows`, which takes either a resident
``torch.Tensor`` (slicing is free) or a lazy :class:`TensorSource` that reads rows from disk (the
streaming path). Methods whose result depends on a whole-tensor statistic (a top-k threshold, a
norm, a dot product) compute it first with bounded-memory reductions over the same chunks, then
produce the output chunk by chunk; for tensors that fit in one chunk this is exactly the plain
computation.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterator, Protocol, Sequence, Union, runtime_checkable

import torch

#: elements per row block (1 MiB of float32): the unit of working memory of every merge method; a
#: merge of K models holds about 2K + 6 blocks at once (larger blocks are barely faster)
CHUNK_ELEMENTS = 1 << 18


@runtime_checkable
class TensorSource(Protocol):
    """A tensor that is read lazily, a block of leading-dimension rows at a time."""

    shape: torch.Size
    dtype: torch.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` along the first dimension (the whole tensor, reshaped to 1 row, if
        0-d)."""
        ...


TensorLike = Union[torch.Tensor, TensorSource]


def n_rows(shape: Sequence[int]) -> int:
    return int(shape[0]) if len(shape) else 1


def row_numel(shape: Sequence[int]) -> int:
    out = 1
    for s in list(shape)[1:]:
        out *= int(s)
    return out


def numel(shape: Sequence[int]) -> int:
    return n_rows(shape) * row_numel(shape)


def row_ranges(shape: Sequence[int], chunk: int | None = None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row blocks of at most ``chunk`` elements (at least one row each)."""
    chunk = CHUNK_ELEMENTS if chunk is None else chunk
    rows, per = n_rows(shape), max(row_numel(shape), 1)
    step = max(1, chunk // per)
    if rows == 0:
        yield (0, 0)
        return
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def read_rows(
    x: TensorLike, start: int, stop: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Rows ``start:stop`` of a tensor or source, as ``dtype`` (no copy when nothing changes)."""
    if isinstance(x, torch.Tensor):
        part = (x.reshape(1) if x.dim() == 0 else x)[start:stop]
    else:
        part = x.rows(start, stop)
    return part if dtype is None else part.to(dtype)


def work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Merges compute in float32, or float64 when an input is float64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def shape_of(x: TensorLike) -> torch.Size:
    return torch.Size(x.shape)


class ChunkSink(Protocol):
    """Receives a method's output chunk by chunk, in row order (the streaming writer)."""

    def write(self, chunk: torch.Tensor) -> None: ...


def map_rows(
    shape: Sequence[int],
    dtype: torch.dtype,
    fn: Callable[[int, int], torch.Tensor],
    out: ChunkSink | None = None,
    chunk: int | None = None,
) -> torch.Tensor | None:
    """Build a ``shape``/``dtype`` tensor from ``fn(start, stop)`` row blocks.

    With ``out`` the blocks go to the sink instead and nothing is kept (returns ``None``): peak
    memory is then one block, whatever the tensor's size.
    """
    shape = torch.Size(shape)
    result = None if out is not None else torch.empty(shape, dtype=dtype)
    flat = None if result is None else (result.reshape(1) if result.dim() == 0 else result)
    for start, stop in row_ranges(shape, chunk):
        piece = fn(start, stop).to(dtype)
        if out is not None:
            out.write(piece)
        else:
            flat[start:stop] = piece.reshape(flat[start:stop].shape)
    return result


def reduce_rows(
    shape: Sequence[int], fn: Callable[[int, int], torch.Tensor], chunk: int | None = None
) -> torch.Tensor:
    """Sum of ``fn(start, stop)`` over the row blocks (float64 accumulation)."""
    total: torch.Tensor | None = None
    for start, stop in row_ranges(shape, chunk):
        part = fn(start, stop).to(torch.float64)
        total = part if total is None else total + part
    assert total is not None
    return total


def kth_largest(
    shape: Sequence[int],
    values: Callable[[int, int], torch.Tensor],
    k: int,
    chunk: int | None = None,
) -> float:
    """The ``k``-th largest of non-negative ``values`` (1-based), read in row blocks.

    One block: ``torch.kthvalue``. Several: a few evenly spaced blocks give a sample whose quantiles
    bracket the answer; one pass then counts the values above the bracket and keeps those inside it
    (about 2% of them), and the answer is selected exactly among those. Should the bracket miss (a
    very uneven tensor), an exact radix select on the float32 bit patterns takes over. Memory stays
    one block (plus the small candidate set) however large the tensor.
    """
    total = numel(shape)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside 1..{total}")
    blocks = list(row_ranges(shape, chunk))
    if len(blocks) == 1:
        flat = values(*blocks[0]).reshape(-1).float()
        return float(torch.kthvalue(flat, total - k + 1).values)
    found = _bracketed(blocks, values, k, total)
    return found if found is not None else _radix(blocks, values, k)


def _bracketed(
    blocks: list[tuple[int, int]], values: Callable[[int, int], torch.Tensor], k: int, total: int
) -> float | None:
    step = max(1, len(blocks) // 4)
    sample = torch.cat(
        [values(*b).reshape(-1)[::4].float().clone() for b in blocks[step // 2 :: step]]
    )
    n = sample.numel()
    q = 1.0 - k / total  # the answer's quantile from the bottom
    margin = 0.01 + 4.0 * (q * (1 - q) / n) ** 0.5
    lo = float(torch.kthvalue(sample, int((q - margin) * n) + 1).values) if q - margin > 0 else 0.0
    hi = (
        float(torch.kthvalue(sample, min(n, int((q + margin) * n) + 1)).values)
        if q + margin < 1
        else float("inf")
    )
    del sample
    above, kept = 0, []
    for start, stop in blocks:
        v = values(start, stop).reshape(-1).float()
        above += int((v > hi).sum())
        kept.append(v[(v >= lo) & (v <= hi)])
    inside = torch.cat(kept)
    rank = k - above  # the answer is the rank-th largest inside [lo, hi]
    if not 1 <= rank <= inside.numel():
        return None
    return float(torch.kthvalue(inside, inside.numel() - rank + 1).values)


def _radix(
    blocks: list[tuple[int, int]], values: Callable[[int, int], torch.Tensor], k: int
) -> float:
    """Exact select by 16-bit histograms of the float32 bit patterns (two passes)."""

    def bits(start: int, stop: int) -> torch.Tensor:
        v = values(start, stop).reshape(-1)
        return (v if v.dtype == torch.float32 else v.float()).view(torch.int32)  # values are >= 0

    high = torch.zeros(1 << 15, dtype=torch.int64)  # sign bit is 0: the top 16 bits are < 2**15
    for start, stop in blocks:
        high += torch.bincount(bits(start, stop) >> 16, minlength=1 << 15)
    bucket, k_in = _bucket_of_kth(high, k)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for start, stop in blocks:
        b = bits(start, stop)
        low += torch.bincount(b[(b >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    sub, _ = _bucket_of_kth(low, k_in)
    word = torch.tensor([(bucket << 16) | sub], dtype=torch.int32)
    return float(word.view(torch.float32))


def _bucket_of_kth(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bucket holding the k-th largest item of a histogram, and k's rank inside that bucket."""
    from_top = hist.flip(0).cumsum(0)
    idx = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))
    above = int(from_top[idx - 1]) if idx > 0 else 0
    return hist.numel() - 1 - idx, k - above


def chunk_generator(seed: int, *keys: object) -> torch.Generator:
    """A generator seeded from ``seed`` and a chunk's identity, so random masks can be
    regenerated."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def resolve_seed(seed: int | None) -> int:
    """A fixed seed for a randomized merge: ``seed`` or one drawn from torch's global generator."""
    return int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item())
