"""LoRA variants as small strategy objects: init schemes and the output combination (plain / DoRA).

Inits set ``lora_A``/``lora_B``; the SVD/QR inits (PiSSA, OLoRA) also move the principal part out of
the base weight, which they do by giving the base module a *new* residual weight parameter and
keeping the original parameter object aside, so that detaching puts back exactly the original.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..core.errors import TargetError
from ..core.quantized import QuantizedBase

if TYPE_CHECKING:  # pragma: no cover
    from ..core.host import DeltaHost
    from .lora import LoRA, LoRADelta


# -- inits ----------------------------------------------------------------------------------------
def _init_default(d: "LoRADelta", host: "DeltaHost") -> None:
    if d.kind == "embedding":  # embeddings: A zero, B random (as peft), so the product starts at 0
        nn.init.zeros_(d.lora_A)
        nn.init.normal_(d.lora_B)
    else:
        nn.init.kaiming_uniform_(d.lora_A, a=math.sqrt(5))
        nn.init.zeros_(d.lora_B)


def _init_gaussian(d: "LoRADelta", host: "DeltaHost") -> None:
    if d.kind == "embedding":
        nn.init.zeros_(d.lora_A)
        nn.init.normal_(d.lora_B, std=1.0 / d.r)
    else:
        nn.init.normal_(d.lora_A, std=1.0 / d.r)
        nn.init.zeros_(d.lora_B)


def _weight_oi(host: "DeltaHost") -> torch.Tensor:
    if host.kind != "linear":
        raise TargetError(
            f"PiSSA/OLoRA inits need Linear-like modules, not {type(host.base).__name__}; use "
            "init='default'"
        )
    if isinstance(host.base, QuantizedBase):
        raise TargetError(
            f"PiSSA/OLoRA rewrite the base weight, which is quantized here ({host.base.format}); "
            "use init='loftq' (LoftQ, made for quantized bases) or init='default'"
        )
    w = host.weight.detach().float()
    return w.t() if host.fan_in_fan_out else w


def _init_pissa(d: "LoRADelta", host: "DeltaHost") -> None:
    """PiSSA: the top-r singular directions of W train, the residual stays frozen."""
    u, s, vh = torch.linalg.svd(_weight_oi(host), full_matrices=False)
    sr = s[: d.r] / d.scaling
    _set_principal(d, host, vh[: d.r] * sr.sqrt()[:, None], u[:, : d.r] * sr.sqrt()[None, :])


def _init_olora(d: "LoRADelta", host: "DeltaHost") -> None:
    """OLoRA: orthonormal Q (→ B) and R (→ A) of W's QR decomposition."""
    q, r = torch.linalg.qr(_weight_oi(host))
    _set_principal(d, host, r[: d.r] / math.sqrt(d.scaling), q[:, : d.r] / math.sqrt(d.scaling))


def _set_principal(d: "LoRADelta", host: "DeltaHost", a: torch.Tensor, b: torch.Tensor) -> None:
    with torch.no_grad():
        d.lora_A.copy_(a)
        d.lora_B.copy_(b)
    # Keep the initial factors: the delta relative to the original W is s·(BA − B0A0).
    d.register_buffer("init_A", d.lora_A.detach().clone())
    d.register_buffer("init_B", d.lora_B.detach().clone())
    _install_residual(d, host)


def _install_residual(d: "LoRADelta", host: "DeltaHost") -> None:
    original = getattr(d, "_original", None)
    original = original[0] if original else host.base.weight
    with torch.no_grad():
        residual = original.detach() - d._product(d.init_A, d.init_B).to(original.dtype)
    d._original = (original,)  # a tuple: not registered as a parameter of the delta
    host.base.weight = nn.Parameter(residual, requires_grad=False)


def _init_loftq(d: "LoRADelta", host: "DeltaHost") -> None:
    """LoftQ (Li et al., https://arxiv.org/abs/2310.08659): on a quantized base, alternate
    ``Q = quantize(W − s·BA)`` and ``s·BA = SVD_r(W − Q)`` (``spec.loftq_iters`` times), so that
    the quantized base plus the starting LoRA is closer to the float weight W than the quantized
    base alone. The base is replaced by the new blocks ``Q`` (the original quantized layer is kept
    aside and put back on detach); W comes from ``quantize_base(..., keep_float=True)``."""
    base = host.base
    if not isinstance(base, QuantizedBase):
        raise TargetError(
            f"init='loftq' needs a quantized base, and {type(base).__name__} is not one; "
            "quantize first (dt.quantize_base(model, 'nf4', keep_float=True)) or use "
            "init='default'"
        )
    kept = getattr(base, "float_reference", None)
    if not kept:
        raise TargetError(
            f"init='loftq' needs the float weights the base was quantized from, and this "
            f"{base.format} layer has none; quantize with dt.quantize_base(model, ..., "
            "keep_float=True) (a GGUF file's blocks have no float original: use init='default')"
        )
    w = kept[0].detach().float()  # (out, in)
    scaling, r = d.scaling, d.r
    low = torch.zeros_like(w)
    for _ in range(d.spec.loftq_iters):
        q = base.requantized(w - low)
        u, s, vh = torch.linalg.svd(w - q.dequantize(), full_matrices=False)
        sr = s[:r].sqrt()
        a, b = vh[:r] * sr[:, None], u[:, :r] * sr[None, :]  # b @ a: the rank-r residual
        low = b @ a
    with torch.no_grad():
        d.lora_A.copy_(a / math.sqrt(scaling))
        d.lora_B.copy_(b / math.sqrt(scaling))
    d._original_base = (base,)  # a tuple: not a submodule of the delta
    q.train(base.training)
    host.base = q
    base.float_reference = None  # used: the float copy of this layer is no longer held


INITS: dict[str, Callable[["LoRADelta", "DeltaHost"], None]] = {
    "default": _init_default,
    "gaussian": _init_gaussian,
    "pissa": _init_pissa,
    "olora": _init_olora,
    "loftq": _init_loftq,
}


# -- output combination ---------------------------------------------------------------------------
class PlainLoRA:
    """``h + s·B·A·x``; weight change ``s·B·A`` (minus the initial product for PiSSA/OLoRA)."""

    name = "plain"

    def setup(self, d: "LoRADelta", host: "DeltaHost") -> None:
        pass

    def combine(
        self, d: "LoRADelta", x: torch.Tensor, h: torch.Tensor, host: "DeltaHost"
    ) -> torch.Tensor:
        return h + (d.lora_out(x, host) * d.scaling).to(h.dtype)

    def weight_change(self, d: "LoRADelta", host: "DeltaHost") -> torch.Tensor:
        w = d.product().detach()
        if getattr(d, "init_A", None) is not None:
            w = w - d._product(d.init_A, d.init_B)
        return w

    def merge(self, d: "LoRADelta", host: "DeltaHost") -> None:
        host.weight.add_(d.product().to(host.weight.dtype))

    def unmerge(self, d: "LoRADelta", host: "DeltaHost") -> None:
        host.weight.sub_(d.product().to(host.weight.dtype))

    def release(self, d: "LoRADelta", host: "DeltaHost") -> None:
        if getattr(d, "_original", None):
            host.base.weight = d._original[0]
        if getattr(d, "_original_base", None):  # LoftQ: the quantized layer before its init
            host.base = d._original_base[0]

    def after_load(self, d: "LoRADelta", host: "DeltaHost") -> None:
        if getattr(d, "init_A", None) is not None:
            _install_residual(d, host)


class DoRA(PlainLoRA):
    """Weight-decomposed LoRA: ``W' = m · (W + s·BA) / ‖W + s·BA‖`` (norm per output, detached).

    As a forward on the unmerged base: ``h + (m/‖·‖ − 1)·(W·x) + (m/‖·‖)·s·BA·x``.
    """

    name = "dora"

    def setup(self, d: "LoRADelta", host: "DeltaHost") -> None:
        if d.kind == "embedding":
            raise TargetError(
                "DoRA is not supported on Embedding modules here; use dora=False for embeddings"
            )
        with torch.no_grad():
            norm = self._norm(d, host)
        d.lora_magnitude = nn.Parameter(norm.clone())

    def _merged_oi(self, d: "LoRADelta", host: "DeltaHost") -> torch.Tensor:
        w = host.weight.to(d.lora_A.dtype) + d.product()
        return w.t() if d.fan_in_fan_out else w  # (out, in, ...)

    def _norm(self, d: "LoRADelta", host: "DeltaHost") -> torch.Tensor:
        w = self._merged_oi(d, host)
        return w.flatten(1).norm(p=2, dim=1)

    def _scale(self, d: "LoRADelta", host: "DeltaHost", like: torch.Tensor) -> torch.Tensor:
        ratio = d.lora_magnitude / self._norm(d, host).detach()
        return ratio.view(1, -1, *([1] * (like.dim() - 2))) if d.kind == "conv" else ratio

    def combine(
        self, d: "LoRADelta", x: torch.Tensor, h: torch.Tensor, host: "DeltaHost"
    ) -> torch.Tensor:
        scale = self._scale(d, host, h)
        base_bias = getattr(host.base, "bias", None)
        if d.dropout is not None and d.training:
            base_no_bias = _plain_call(
                host, x
            )  # W·dropout(x): the dropped input goes through W too
        elif base_bias is not None:
            base_no_bias = h - (
                base_bias.view(1, -1, *([1] * (h.dim() - 2))) if d.kind == "conv" else base_bias
            )
        else:
            base_no_bias = h
        lora = d.lora_out(x, host) * d.scaling
        return h + ((scale - 1) * base_no_bias + scale * lora).to(h.dtype)

    def weight_change(self, d: "LoRADelta", host: "DeltaHost") -> torch.Tensor:
        w = self._merged_oi(d, host).detach()
        shape = (-1,) + (1,) * (w.dim() - 1)
        new = w * (d.lora_magnitude.detach() / w.flatten(1).norm(p=2, dim=1)).view(shape)
        new = new.t() if d.fan_in_fan_out else new
        return new - host.weight.to(new.dtype)

    def merge(self, d: "LoRADelta", host: "DeltaHost") -> None:
        w = self._merged_oi(d, host)
        norm = w.flatten(1).norm(p=2, dim=1)
        d._merge_norm = norm  # kept to invert exactly what merge did
        shape = (-1,) + (1,) * (w.dim() - 1)
        new = w * (d.lora_magnitude / norm).view(shape)
        host.weight.copy_((new.t() if d.fan_in_fan_out else new).to(host.weight.dtype))

    def unmerge(self, d: "LoRADelta", host: "DeltaHost") -> None:
        w = host.weight.to(d.lora_A.dtype)
        w = w.t() if d.fan_in_fan_out else w
        shape = (-1,) + (1,) * (w.dim() - 1)
        old = w * (d._merge_norm / d.lora_magnitude).view(shape)
        old = (old.t() if d.fan_in_fan_out else old) - d.product()
        host.weight.copy_(old.to(host.weight.dtype))


def _plain_call(host: "DeltaHost", x: torch.Tensor) -> torch.Tensor:
    b = host.base
    if host.kind == "conv":
        return host.conv(x, b.weight)
    w = b.weight.t() if host.fan_in_fan_out else b.weight
    return torch.nn.functional.linear(x, w.to(x.dtype))


def variant_for(spec: "LoRA") -> PlainLoRA:
    return DoRA() if spec.dora else PlainLoRA()
