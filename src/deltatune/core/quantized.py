"""The contract of a frozen base layer stored in its own (quantized) format.

ARCHITECTURE.md: quantized frozen weights are a host's *base*, and core sees only "a base layer
with a forward and, maybe, a way to fold a delta in". :class:`QuantizedBase` is that layer: a
Linear-like module (``in_features``, ``out_features``, ``bias``) whose weight exists only as blocks
(int4 groups, GGUF Q4_1, ...). Its ``weight`` is a float view computed on demand, with no gradient,
so methods that read the base weight (DoRA's norms, OFT's rotation) work unchanged; nothing can
write into it.

Folding a delta in is lossy, so :func:`deltatune.merge` must be told how: ``requantize=True``
(dequantize one layer, add the change, quantize again, record the error) or ``dtype="float32"``
(the layer becomes a plain float ``nn.Linear``). The implementations live in
:mod:`deltatune.quant`; core knows only this contract.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import StateError

if TYPE_CHECKING:  # pragma: no cover
    from .host import DeltaHost

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


class QuantizedBase(nn.Linear):
    """A frozen Linear whose weight is kept quantized; subclasses store the blocks.

    It is an ``nn.Linear`` to every ``isinstance`` check (methods that host Linear layers only,
    model code), but holds no weight parameter: ``nn.Linear.__init__`` is skipped and ``weight``
    is the dequantizing property below.

    Subclasses implement :meth:`dequantize` (the float ``(out, in)`` weight, rebuilt from the
    blocks), :meth:`requantized` (a new layer of the same format holding ``Q(weight)``) and
    ``forward``. ``merge_error`` is set on a layer made by a re-quantizing merge: the relative
    Frobenius error ``‖Q(W') − W'‖ / ‖W'‖`` of the merged weight ``W'``.
    """

    in_features: int
    out_features: int
    #: a short name of the storage format, used in messages ("int4 (group 64)", "gguf Q4_1")
    format: str = "quantized"
    merge_error: float | None = None
    #: how the last merge into this layer was stored: "offset" (exact, see :meth:`shifted`) or
    #: "requantized" (re-rounded)
    merge_kind: str | None = None
    #: formats that store ``w = scale·q + offset`` per group of this many inputs (int4, GGUF Q4_1)
    #: can take a change that is constant over each group into the offsets, exactly (QA-LoRA);
    #: None for symmetric formats (nf4, Q4_0, Q8_0, int8)
    offset_group: int | None = None

    def __init__(self) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float weight

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def requantized(self, weight: torch.Tensor) -> "QuantizedBase":
        raise NotImplementedError

    def shifted(self, offsets: torch.Tensor) -> "QuantizedBase":
        """A new layer of the same codes and scales whose per-group offsets are moved by
        ``offsets`` (out, in / offset_group): the weight plus a group-constant change, with no
        re-rounding of any code. Only formats with an ``offset_group``."""
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The float weight, rebuilt from the blocks each time (read-only: no gradient, and
        writing into it changes nothing)."""
        return self.dequantize()

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain float ``nn.Linear`` with the dequantized weight and this layer's bias."""
        w = self.dequantize(dtype)
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=w.device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
            if self.bias is not None:
                layer.bias.copy_(self.bias.to(dtype))
        layer.requires_grad_(False)
        layer.train(self.training)
        return layer


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantizedBase)


def check_merge_how(hosts: list[tuple[str, "DeltaHost"]], requantize: bool,
                    dtype: str | None, keep_blocks: bool) -> None:
    """Refuse a merge into quantized bases that does not say how (before any weight changes), and
    tell each quantized host how it is to be merged."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise StateError(f"merge dtype {dtype!r} is not a float type; use one of "
                         f"{', '.join(FLOAT_DTYPES)}")
    if requantize and dtype is not None:
        raise StateError("merge: pass requantize=True or dtype=..., not both")
    quantized = [(p, h) for p, h in hosts if isinstance(h.base, QuantizedBase)]
    if quantized and not requantize and dtype is None:
        path, host = quantized[0]
        raise StateError(
            f"{len(quantized)} layer(s) to merge have a quantized base (e.g. {path!r}: "
            f"{host.base.format}); say how to merge: dt.merge(model, dtype='float32') to make "
            "those layers float (exact), or dt.merge(model, requantize=True) to quantize the "
            "merged weights again (lossy for a plain LoRA on 4-bit layers: train dt.QALoRA for an "
            "exact 4-bit merge)"
        )
    for _, host in quantized:
        host.quantized_merge = (requantize, dtype, keep_blocks)


def _is_four_bit(layer_format: str) -> bool:
    """int4, nf4 and GGUF Q4_* layers (``QuantizedBase.format``), where one level is a coarse
    step."""
    name = layer_format.lower()
    return name.startswith(("int4", "nf4")) or "q4_" in name


def merge_quantized(host: "DeltaHost") -> list[str]:
    """Merge ``host``'s active deltas into its quantized base, one layer in float at a time.

    The base is swapped for its dequantized float ``nn.Linear`` while the deltas fold in through
    their usual ``merge_into`` (so every foldable method merges the same way as on a float base),
    then quantized again (``requantize``) or kept as a float layer (``dtype``). The original blocks
    stay with the host (``host.quantized_original``) until :func:`deltatune.merge` finishes, so a
    failed merge rolls back exactly; they are kept after it for a float merge (they are small) or
    with ``keep_blocks``, so that unmerge puts them back exactly.
    """
    how = getattr(host, "quantized_merge", None)
    if how is None:
        raise StateError(
            f"the base is quantized ({host.base.format}); say how to merge: dt.merge(model, "
            "requantize=True) or dt.merge(model, dtype='float32')"
        )
    requantize, dtype, _ = how
    original = host.base
    assert isinstance(original, QuantizedBase)
    host.base = original.to_linear(torch.float32)
    try:
        done = host.merge()
    except BaseException:
        host.base = original
        raise
    if not done:
        host.base = original
        return done
    if requantize:
        merged = host.base.weight.detach()
        offsets = _group_constant(merged - original.dequantize(), original.offset_group)
        if offsets is not None:  # QA-LoRA's case: fold into the offsets, no code changes
            new, new.merge_kind = original.shifted(offsets), "offset"
        else:
            new, new.merge_kind = original.requantized(merged), "requantized"
        err = (new.dequantize() - merged).norm() / merged.norm().clamp(min=1e-30)
        new.merge_error = float(err)
        if original.bias is not None:
            new.bias = nn.Parameter(host.base.bias.detach().clone(), requires_grad=False)
        new.train(original.training)
        host.base = new
    else:
        host.base = host.base.to(FLOAT_DTYPES[dtype or "float32"])
    host.quantized_original = (original,)  # a tuple: kept out of the module tree and state dict
    return done


def _group_constant(change: torch.Tensor, group: int | None) -> torch.Tensor | None:
    """The per-group values (out, in / group) of ``change`` when it is constant over every group
    of ``group`` inputs (to float32 rounding of the merge), else None."""
    if not group or change.shape[-1] % group:
        return None
    g = change.reshape(change.shape[0], -1, group)
    mean = g.mean(-1)
    spread = float((g - mean[..., None]).abs().max()) if g.numel() else 0.0
    return mean if spread <= 1e-6 * max(float(change.abs().max()), 1e-12) + 1e-9 else None


def warn_rerounded(hosts: list["DeltaHost"]) -> None:
    """After a re-quantizing merge: warn when 4-bit layers had to be re-rounded (the change was
    not constant over their groups, as a plain LoRA's is not)."""
    four_bit = [h.base.format for h in hosts if isinstance(h.base, QuantizedBase)
                and h.base.merge_kind == "requantized" and _is_four_bit(h.base.format)]
    if four_bit:
        warnings.warn(
            f"re-quantizing a merge into {len(four_bit)} 4-bit layer(s) ({four_bit[0]}) re-rounded "
            "their weights by about as much as a trained delta (on SmolLM2 a LoRA's exact match "
            "fell from 60% to 0%); train dt.QALoRA for an exact 4-bit merge, or use "
            "dt.merge(model, dtype='float32'), or keep the adapter unmerged "
            "(docs/quantization.md)",
            UserWarning,
            stacklevel=3,
        )


def finish_merge(host: "DeltaHost") -> None:
    """After a whole-model merge succeeded: drop the original blocks of re-quantized layers unless
    ``keep_blocks`` (they cost memory and the caller asked for the merged form only)."""
    how = getattr(host, "quantized_merge", None)
    if how is not None and how[0] and not how[2] and getattr(host, "quantized_original", None):
        host.quantized_original = (None,)


def unmerge_quantized(host: "DeltaHost") -> bool:
    """Undo a merge into a quantized base: put the original blocks back. False when the host's
    base was not merged from a quantized one (the caller unmerges as usual)."""
    kept = getattr(host, "quantized_original", None)
    if not kept:
        return False
    if kept[0] is None:
        raise StateError(
            f"cannot unmerge: the layer was re-quantized after merging ({host.base.format}), "
            "which is not exactly reversible; merge with keep_blocks=True to be able to unmerge, "
            "or reload the model"
        )
    host.base = kept[0]
    host.quantized_original = None
    return True


def requantization_errors(model: nn.Module) -> dict[str, float]:
    """Per layer, the relative error of re-quantizing the merged weights (layers merged with
    ``dt.merge(model, requantize=True)``; after ``unload=True`` too)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedBase) and module.merge_error is not None:
            path = name[: -len(".base")] if name.endswith(".base") else name
            out[path] = module.merge_error
    return out
