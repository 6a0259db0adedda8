"""Weight-only quantization formats as pure tensor functions (quantize → blocks, blocks → float).

* ``int4``: per group of ``group_size`` inputs, asymmetric affine (scale and minimum in float16),
  4-bit codes packed two per byte. torchao's int4 weight-only layouts need CUDA or the mslk kernels
  (torchao 0.18 on CPU: "Requires mslk >= 1.0.0"), so this small packed form is ours.
* ``nf4``: QLoRA's NormalFloat-4 (Dettmers et al., https://arxiv.org/abs/2305.14314): per group, the
  absolute maximum (float16) and the index of the nearest of 16 normal quantiles, packed two a byte.
* GGUF blocks ``Q4_0``, ``Q4_1``, ``Q8_0``: llama.cpp's 32-value blocks, dequantized here in torch
  (checked against the ``gguf`` package's reference dequantizer in the tests) and quantized by the
  ``gguf`` package's reference quantizers.

Every function works on a 2-D weight ``(out, in)``; a group or block never crosses a row.
"""

from __future__ import annotations

import numpy as np
import torch

#: the 16 NF4 code values (QLoRA, appendix E): quantiles of N(0, 1), scaled to [-1, 1]
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230850219727, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) codes in 0..15 → (out, in/2) uint8, element 2j in the low nibble."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8 → (out, in) codes as uint8."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)  # interleave back: 2j low, 2j+1 high


def quantize_int4(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """Asymmetric 4-bit groups: ``w ≈ scale·q + minimum``, q in 0..15."""
    out, n = w.shape
    g = w.detach().float().reshape(out, n // group, group)  # (out, groups, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8).half()
    lo = lo.half()
    q = ((g - lo.float()) / scale.float()).round().clamp(0, 15).reshape(out, n)
    return {"packed": pack_nibbles(q), "scale": scale.squeeze(-1), "minimum": lo.squeeze(-1)}


def dequantize_int4(parts: dict[str, torch.Tensor], group: int, dtype: torch.dtype
                    ) -> torch.Tensor:
    q = unpack_nibbles(parts["packed"])
    out, n = q.shape
    q = q.reshape(out, n // group, group).to(dtype)  # (out, groups, group)
    w = q * parts["scale"].to(dtype)[..., None] + parts["minimum"].to(dtype)[..., None]
    return w.reshape(out, n)


def quantize_nf4(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """NF4 groups: ``w ≈ absmax·NF4[q]``."""
    out, n = w.shape
    g = w.detach().float().reshape(out, n // group, group)
    absmax = g.abs().amax(-1, keepdim=True).clamp(min=1e-8).half()
    x = (g / absmax.float()).reshape(out, n)
    # nearest code value: the codes are sorted, so search the midpoints between neighbours
    mids = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
    q = torch.bucketize(x, mids.to(x.device))
    return {"packed": pack_nibbles(q), "absmax": absmax.squeeze(-1)}


def dequantize_nf4(parts: dict[str, torch.Tensor], group: int, dtype: torch.dtype
                   ) -> torch.Tensor:
    q = unpack_nibbles(parts["packed"]).long()
    out, n = q.shape
    code = NF4_CODE.to(device=q.device, dtype=dtype)
    w = code[q].reshape(out, n // group, group) * parts["absmax"].to(dtype)[..., None]
    return w.reshape(out, n)


# -- GGUF blocks ----------------------------------------------------------------------------------
#: GGUF block types kept as blocks: name → (values per block, bytes per block)
GGUF_BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34)}


def dequantize_gguf(blocks: torch.Tensor, qtype: str, dtype: torch.dtype) -> torch.Tensor:
    """(out, bytes per row) uint8 GGUF blocks → (out, in) float weight, all rows at once."""
    out = blocks.shape[0]
    nb = GGUF_BLOCKS[qtype][1]
    b = blocks.reshape(out, -1, nb)  # (out, blocks, bytes per block)
    d = b[..., 0:2].contiguous().view(torch.float16).to(dtype)  # (out, blocks, 1)
    if qtype == "Q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).to(dtype)  # (out, blocks, 32)
        return (d * q).reshape(out, -1)
    if qtype == "Q4_0":
        qs = b[..., 2:]
        q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).to(dtype) - 8  # low nibbles first 16 values
        return (d * q).reshape(out, -1)
    m = b[..., 2:4].contiguous().view(torch.float16).to(dtype)  # Q4_1: w = d·q + m
    qs = b[..., 4:]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).to(dtype)
    return (d * q + m).reshape(out, -1)


def quantize_gguf(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """(out, in) float weight → (out, bytes per row) uint8 blocks, by the ``gguf`` package's
    reference quantizer (the one llama.cpp's converter uses)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    data = quantize(w.detach().float().cpu().numpy(), GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(data))
