"""Quantized frozen Linear layers: the bases a delta host wraps (:class:`QuantizedBase`).

Each keeps only its blocks (and the float bias) and rebuilds the float weight per forward, one layer
at a time. The matmul runs through :class:`_Dequantized`, which rebuilds the weight again in the
backward pass instead of saving it: autograd would otherwise keep every layer's float weight alive
until the backward pass, i.e. a float copy of the whole model at the memory peak. Gradients flow to
the input (and so to the deltas before this layer); the blocks are buffers and never get one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.quantized import QuantizedBase
from .formats import (
    GGUF_BLOCKS,
    dequantize_gguf,
    dequantize_int4,
    dequantize_nf4,
    quantize_gguf,
    quantize_int4,
    quantize_nf4,
)


class _Dequantized(torch.autograd.Function):
    """``x @ W(blocks)ᵀ`` where W is rebuilt in forward and again in backward (never saved)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: "QuantizedBase") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantize(grad.dtype), None  # (..., out) @ (out, in)


class _Frozen(QuantizedBase):
    """Shared parts: sizes, the frozen float bias and the dequantizing forward."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(
            bias.detach().float().clone(), requires_grad=False)
        #: the float weight this layer was quantized from, kept only on request
        #: (``quantize_base(..., keep_float=True)``) until LoftQ uses it; a tuple keeps it out of
        #: the state dict
        self.float_reference: tuple[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Dequantized.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"format={self.format}, bias={self.bias is not None}"

    def storage_bytes(self) -> int:
        """Bytes of the blocks and their scales (what the layer costs in memory)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


class GroupQuantLinear(_Frozen):
    """int4 (affine) or nf4 groups of ``group`` inputs, two codes a byte (see :mod:`.formats`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str,
                 group: int) -> None:
        out, n = weight.shape
        super().__init__(n, out, bias)
        self.scheme, self.group = scheme, group
        self.format = f"{scheme} (group {group})"
        self.offset_group = group if scheme == "int4" else None  # int4 is affine, nf4 symmetric
        parts = (quantize_int4 if scheme == "int4" else quantize_nf4)(weight, group)
        for name, tensor in parts.items():
            self.register_buffer(name, tensor.to(weight.device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.scheme == "int4":
            parts = {"packed": self.packed, "scale": self.scale, "minimum": self.minimum}
            return dequantize_int4(parts, self.group, dtype)
        return dequantize_nf4({"packed": self.packed, "absmax": self.absmax}, self.group, dtype)

    def requantized(self, weight: torch.Tensor) -> "GroupQuantLinear":
        return GroupQuantLinear(weight, self.bias, self.scheme, self.group)

    def shifted(self, offsets: torch.Tensor) -> "GroupQuantLinear":
        if self.offset_group is None:
            raise NotImplementedError(f"{self.format} has no per-group offset")
        new = GroupQuantLinear.__new__(GroupQuantLinear)
        _Frozen.__init__(new, self.in_features, self.out_features, self.bias)
        new.scheme, new.group, new.format = self.scheme, self.group, self.format
        new.offset_group = self.offset_group
        new.register_buffer("packed", self.packed)  # the codes and scales are shared, unchanged
        new.register_buffer("scale", self.scale)
        minimum = self.minimum.float() + offsets.to(self.minimum.device).float()
        new.register_buffer("minimum", minimum.to(self.minimum.dtype))
        return new


class Int8Linear(_Frozen):
    """int8 weight-only by torchao (``Int8WeightOnlyConfig``: per output row, or per group of
    ``group`` inputs); its tensor subclass runs the matmul on CPU and CUDA."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 group: int | None) -> None:
        out, n = weight.shape
        super().__init__(n, out, bias)
        self.group = group
        self.format = "int8 (torchao, " + (f"group {group})" if group else "per row)")
        self.register_buffer("qweight", _torchao_int8(weight, group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchao's own kernel; autograd keeps the int8 tensor (not a float copy) for backward
        y = F.linear(x, self.qweight)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.dequantize().to(dtype)

    def storage_bytes(self) -> int:
        q = self.qweight  # a tensor subclass: count its inner tensors (codes, scales)
        inner = [getattr(q, n) for n in q.__tensor_flatten__()[0]]
        return sum(t.numel() * t.element_size() for t in inner if t is not None)

    def requantized(self, weight: torch.Tensor) -> "Int8Linear":
        return Int8Linear(weight, self.bias, self.group)


def _torchao_int8(weight: torch.Tensor, group: int | None) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from torchao.quantization import Int8WeightOnlyConfig, PerGroup, quantize_
        except ImportError:
            raise ValueError(
                'int8 needs torchao, which is not installed: pip install "deltatune[quant]" '
                "(or use int4, nf4 or a GGUF block type, which need nothing more)"
            ) from None
    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
    with torch.no_grad():
        holder.weight.copy_(weight.detach().float())
    config = Int8WeightOnlyConfig(granularity=PerGroup(group)) if group else Int8WeightOnlyConfig()
    quantize_(holder, config)
    return holder.weight.detach()


class GGUFLinear(_Frozen):
    """A Linear kept in GGUF blocks (Q4_0, Q4_1, Q8_0): the rows of the file's tensor, as bytes."""

    def __init__(self, blocks: torch.Tensor, qtype: str, in_features: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__(in_features, blocks.shape[0], bias)
        self.qtype = qtype
        self.format = f"gguf {qtype}"
        self.offset_group = 32 if qtype == "Q4_1" else None  # Q4_1: w = d·q + m per block
        self.register_buffer("blocks", blocks)  # (out, in / 32 · bytes per block) uint8

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None,
                    qtype: str) -> "GGUFLinear":
        return cls(quantize_gguf(weight, qtype).to(weight.device), qtype, weight.shape[1], bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_gguf(self.blocks, self.qtype, dtype)

    def requantized(self, weight: torch.Tensor) -> "GGUFLinear":
        return GGUFLinear.from_weight(weight, self.bias, self.qtype)

    def shifted(self, offsets: torch.Tensor) -> "GGUFLinear":
        if self.offset_group is None:
            raise NotImplementedError(f"{self.format} has no per-block offset")
        nb = GGUF_BLOCKS[self.qtype][1]
        blocks = self.blocks.clone()
        b = blocks.view(blocks.shape[0], -1, nb)  # (out, blocks, 20): d, m (float16), codes
        m = b[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
        m = (m + offsets.to(m.device).float()).to(torch.float16)
        b[..., 2:4] = m.unsqueeze(-1).view(torch.uint8)
        return GGUFLinear(blocks, self.qtype, self.in_features, self.bias)


__all__ = ["GGUF_BLOCKS", "GGUFLinear", "GroupQuantLinear", "Int8Linear"]
