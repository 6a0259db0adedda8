"""Per-tensor delta codecs: encode one tensor into packed parts, decode it back.

A codec turns a floating tensor δ into a few small tensors ("parts", stored in safetensors) plus a
JSON-able ``meta`` dict; ``decode(meta, parts)`` rebuilds δ (exactly for ``raw``; the lossy codecs
are exact up to their own quantisation, i.e. decode(encode(δ)) is the codec's δ̂ bit for bit).

- ``compeft``: keep the top-``density`` magnitudes, ternary ``{-1, 0, +1}`` × one scale per tensor.
  ComPEFT, Yadav et al. 2023, https://arxiv.org/abs/2311.13171
- ``bitdelta``: ``sign(δ)`` × one scale per matrix (mean |δ|, optionally calibrated by
  distillation). BitDelta, Liu et al. 2024, https://arxiv.org/abs/2402.10193
- ``dare``: keep each entry with probability ``density``, rescale by ``1/density``.
  DARE, Yu et al. 2023, https://arxiv.org/abs/2311.03099
- ``int8`` / ``int4``: symmetric per-output-channel (first dimension) absmax quantisation.
- ``lowrank``: truncated SVD ``δ ≈ B·A`` at a chosen rank (full fine-tuning delta → LoRA factors).

Packing: sign and mask bits with ``numpy.packbits`` (8 per byte), 4-bit integers two per byte.
Sparse positions are stored as a bitmask (n/8 bytes) or as int32 indices (4 bytes each), whichever
is smaller.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from ..core.errors import DeltaError
from ..core.registry import Registry

Parts = dict[str, torch.Tensor]


class CompressError(DeltaError):
    """A codec cannot represent a delta, a codec option is bad, or a packed file is corrupt."""


# -- bit packing ----------------------------------------------------------------------------------
def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A bool tensor (any shape) → uint8, 8 flags per byte (flattened, zero padded)."""
    return torch.from_numpy(np.packbits(bits.reshape(-1).cpu().numpy().astype(np.uint8)))


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    if packed.dtype != torch.uint8 or packed.numel() != (n + 7) // 8:
        raise CompressError(
            f"packed bit field has {packed.numel()} bytes of {packed.dtype}, expected "
            f"{(n + 7) // 8} uint8; the compressed file is corrupt"
        )
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool))


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """Integers in [0, 15] → uint8, two per byte."""
    flat = values.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise CompressError(
            f"packed 4-bit field has {packed.numel()} bytes, expected {(n + 1) // 2}; the file is "
            "corrupt"
        )
    out = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    return out[:n]


# -- sparse positions -----------------------------------------------------------------------------
def encode_positions(keep: torch.Tensor) -> Parts:
    """A bool mask as the smaller of a bitmask and int32 indices."""
    n, k = keep.numel(), int(keep.sum())
    if 4 * k < (n + 7) // 8:
        return {"index": keep.reshape(-1).nonzero().squeeze(1).to(torch.int32)}
    return {"mask": pack_bits(keep)}


def decode_positions(parts: Parts, n: int) -> torch.Tensor:
    if "index" in parts:
        idx = parts["index"].to(torch.int64)
        if idx.dim() != 1 or (idx.numel() and (idx.min() < 0 or idx.max() >= n)):
            raise CompressError("sparse indices are out of range; the compressed file is corrupt")
        keep = torch.zeros(n, dtype=torch.bool)
        keep[idx] = True
        return keep
    if "mask" in parts:
        return unpack_bits(parts["mask"], n)
    raise CompressError(
        "a sparse entry has neither 'mask' nor 'index'; the compressed file is corrupt"
    )


def _top_k_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    flat = delta.reshape(-1).abs()
    k = max(1, min(flat.numel(), int(round(density * flat.numel()))))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[flat.topk(k, sorted=False).indices] = True
    return keep


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor([float(value)], dtype=torch.float32)


# -- codecs ---------------------------------------------------------------------------------------
def encode_compeft(
    delta: torch.Tensor, *, density: float = 0.1, scale: str = "mean", alpha: float = 1.0, **_: Any
):
    """Top-k magnitudes → signs on a sparse support × one scale.

    ``scale="mean"``: the mean |δ| over the kept entries (the least-squares optimum for a fixed
    support and sign); ``"std"``: the standard deviation of δ, as in the paper. ``alpha`` multiplies
    either (the paper searches it on held-out data: see :func:`deltatune.compress.search_alpha`)."""
    d = delta.detach().float().cpu()
    keep = _top_k_mask(d, density)
    flat = d.reshape(-1)
    base = flat[keep].abs().mean() if scale == "mean" else d.std()
    signs = flat[keep] > 0
    parts = {
        **encode_positions(keep),
        "signs": pack_bits(signs),
        "scale": _scalar(alpha * float(base)),
    }
    return parts, {"kept": int(keep.sum())}


def decode_compeft(meta: dict, parts: Parts) -> torch.Tensor:
    n = math.prod(meta["shape"])
    keep = decode_positions(parts, n)
    k = int(keep.sum())
    signs = unpack_bits(parts["signs"], k).to(torch.float32) * 2 - 1
    out = torch.zeros(n)
    out[keep] = signs * parts["scale"].float()
    return out


def encode_bitdelta(delta: torch.Tensor, **_: Any):
    d = delta.detach().float().cpu()
    return {"signs": pack_bits(d > 0), "scale": _scalar(d.abs().mean())}, {}


def decode_bitdelta(meta: dict, parts: Parts) -> torch.Tensor:
    n = math.prod(meta["shape"])
    return (unpack_bits(parts["signs"], n).to(torch.float32) * 2 - 1) * parts["scale"].float()


def encode_dare(
    delta: torch.Tensor,
    *,
    density: float = 0.1,
    seed: int = 0,
    values: str = "float32",
    index: int = 0,
    **_: Any,
):
    d = delta.detach().float().cpu()
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    keep = torch.rand(d.numel(), generator=g) < density
    kept = d.reshape(-1)[keep] / density
    return {**encode_positions(keep), "values": kept.to(getattr(torch, values))}, {
        "kept": int(keep.sum())
    }


def decode_dare(meta: dict, parts: Parts) -> torch.Tensor:
    n = math.prod(meta["shape"])
    keep = decode_positions(parts, n)
    out = torch.zeros(n)
    values = parts["values"].float()
    if values.numel() != int(keep.sum()):
        raise CompressError(
            "DARE values and positions disagree in count; the compressed file is corrupt"
        )
    out[keep] = values
    return out


def _encode_int(delta: torch.Tensor, bits: int):
    d = delta.detach().float().cpu()
    rows = d.reshape(d.shape[0], -1) if d.dim() > 1 else d.reshape(1, -1)
    qmax = 2 ** (bits - 1) - 1
    scale = rows.abs().amax(dim=1).clamp(min=1e-12) / qmax
    q = torch.round(rows / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    if bits == 8:
        return {"q": q.reshape(-1), "scale": scale}, {}
    return {"q": pack_nibbles(q.reshape(-1) + 8), "scale": scale}, {}


def _decode_int(meta: dict, parts: Parts, bits: int) -> torch.Tensor:
    n = math.prod(meta["shape"])
    scale = parts["scale"].float()
    q = (
        parts["q"].to(torch.float32)
        if bits == 8
        else unpack_nibbles(parts["q"], n).to(torch.float32) - 8
    )
    if q.numel() != n or n % scale.numel():
        raise CompressError(
            "quantised values do not fit the recorded shape; the compressed file is corrupt"
        )
    return (q.reshape(scale.numel(), -1) * scale[:, None]).reshape(-1)


def encode_lowrank(delta: torch.Tensor, *, rank: int = 16, **_: Any):
    d = delta.detach().float().cpu()
    if d.dim() != 2:
        raise CompressError(
            f"lowrank needs 2-D weight deltas, got shape {tuple(d.shape)}; keep such tensors raw"
        )
    if rank > min(d.shape):
        raise CompressError(
            f"rank {rank} is larger than the matrix allows (shape {tuple(d.shape)}, at most "
            f"{min(d.shape)}); pass a smaller --rank"
        )
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    kept = float(s[:rank].square().sum() / s.square().sum().clamp(min=1e-30))
    return {"B": (u[:, :rank] * s[:rank]).contiguous(), "A": vh[:rank].contiguous()}, {
        "energy": kept
    }


def decode_lowrank(meta: dict, parts: Parts) -> torch.Tensor:
    return (parts["B"].float() @ parts["A"].float()).reshape(-1)


def encode_raw(delta: torch.Tensor, **_: Any):
    return {"value": delta.detach().cpu().contiguous()}, {}


def decode_raw(meta: dict, parts: Parts) -> torch.Tensor:
    return parts["value"].reshape(-1)


Encoder = Callable[..., tuple[Parts, dict]]


class Codec(NamedTuple):
    """One codec: ``encode(δ, **options) -> (parts, meta)``, ``decode(meta, parts) -> flat δ̂``."""

    encode: Encoder
    decode: Callable[[dict, Parts], torch.Tensor]


#: every codec by name; ``raw`` (tensors kept as they are) is internal: decoded, never chosen
CODECS: Registry[Codec] = Registry("codec", CompressError)
CODECS.register("compeft", Codec(encode_compeft, decode_compeft))
CODECS.register("bitdelta", Codec(encode_bitdelta, decode_bitdelta))
CODECS.register("dare", Codec(encode_dare, decode_dare))
CODECS.register("int8", Codec(lambda d, **_: _encode_int(d, 8), lambda m, p: _decode_int(m, p, 8)))
CODECS.register("int4", Codec(lambda d, **_: _encode_int(d, 4), lambda m, p: _decode_int(m, p, 4)))
CODECS.register("lowrank", Codec(encode_lowrank, decode_lowrank))
CODECS.register("raw", Codec(encode_raw, decode_raw), internal=True)
#: codecs whose ``scale`` part is one number per tensor that can be rescaled or calibrated
SCALED = ("compeft", "bitdelta")


def check_options(
    codec: str, density: float, rank: int, scale: str, alpha: float, values: str
) -> None:
    if codec not in CODECS.names():
        raise CompressError(CODECS.unknown(codec))
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise CompressError(
            f"density={density!r} must be in (0, 1], e.g. 0.1 keeps 10% of the entries"
        )
    if not (isinstance(rank, int) and rank >= 1):
        raise CompressError(f"rank={rank!r} must be a positive integer")
    if scale not in ("mean", "std"):
        raise CompressError(f"scale={scale!r} must be 'mean' or 'std'")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise CompressError(f"alpha={alpha!r} must be a finite number > 0")
    if values not in ("float32", "float16", "bfloat16"):
        raise CompressError(f"values={values!r} must be float32, float16 or bfloat16")


def decode(meta: dict, parts: Parts) -> torch.Tensor:
    """Rebuild one tensor from its ``meta`` (codec, shape, dtype) and packed ``parts``."""
    codec = meta.get("codec")
    if codec not in CODECS:
        raise CompressError(
            f"unknown codec {codec!r} in the compressed file; it was written by a newer deltatune"
        )
    try:
        flat = CODECS.get(codec).decode(meta, parts)
    except KeyError as exc:
        raise CompressError(
            f"a {codec} entry lacks its part {exc}; the compressed file is corrupt"
        ) from None
    shape = tuple(meta["shape"])
    if flat.numel() != math.prod(shape):
        raise CompressError(
            f"a {codec} entry decodes to {flat.numel()} numbers, not {shape}; the file is corrupt"
        )
    return flat.reshape(shape).to(getattr(torch, meta.get("dtype", "float32")))
