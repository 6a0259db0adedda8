"""Quantized frozen bases: ``quantize_base(model, "int4")`` keeps every frozen Linear quantized.

The layers (:mod:`.layers`) are :class:`~deltatune.core.quantized.QuantizedBase` modules, so every
Linear method attaches on top of them (the host wraps the quantized layer as its base), gradients
reach the deltas and the activations only, and :func:`deltatune.merge` folds deltas in when told how
(``requantize=True`` or ``dtype="float32"``). Schemes:

==========  ==============================================  =================  ==================
name        storage                                         implementation     group size
==========  ==============================================  =================  ==================
``int8``    int8 codes, float scale per row (or group)      torchao            None (per row)
``int4``    4-bit affine codes, float16 scale + minimum     deltatune          64
``nf4``     4-bit NormalFloat codes, float16 absmax         deltatune          64
``q8_0``    GGUF Q8_0 blocks                                gguf (quantizer)   32 (fixed)
``q4_0``    GGUF Q4_0 blocks                                gguf (quantizer)   32 (fixed)
``q4_1``    GGUF Q4_1 blocks                                gguf (quantizer)   32 (fixed)
==========  ==============================================  =================  ==================

A GGUF model file can also be loaded straight into its own blocks, with no float copy of its Linear
weights (``load_model("smollm2", quantize="gguf")``, :mod:`deltatune.models.gguf_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.errors import DeltaError
from ..core.host import Host
from ..core.quantized import QuantizedBase, requantization_errors
from ..core.registry import Registry
from .layers import GGUF_BLOCKS, GGUFLinear, GroupQuantLinear, Int8Linear


class QuantizeError(DeltaError):
    """An unknown scheme, a group size that does not fit, a model with nothing to quantize."""


@dataclass(frozen=True)
class Scheme:
    description: str
    default_group: int | None
    fixed_group: int | None = None  # GGUF blocks: always 32


#: the weight-only quantization schemes by name
SCHEMES: Registry[Scheme] = Registry(
    "quantization", QuantizeError,
    message="unknown {kind} {name!r}{hint}; use one of {known} (or 'gguf' when loading a GGUF "
            "file)")
SCHEMES.register("int8", Scheme("int8 weight-only (torchao)", None))
SCHEMES.register("int4", Scheme("4-bit affine groups", 64))
SCHEMES.register("nf4", Scheme("4-bit NormalFloat groups (QLoRA)", 64))
for _q in GGUF_BLOCKS:
    SCHEMES.register(_q.lower(), Scheme(f"GGUF {_q} blocks", 32, fixed_group=32))


@dataclass
class QuantizeReport:
    """What :func:`quantize_base` did: the layers replaced and their bytes before and after."""

    scheme: str
    group_size: int | None
    layers: int
    float_bytes: int
    quantized_bytes: int
    skipped: list[str]

    @property
    def ratio(self) -> float:
        return self.quantized_bytes / max(self.float_bytes, 1)


def _tied_ids(model: nn.Module) -> set[int]:
    """Weights shared with a non-Linear module (a tied output head shares the embedding): they
    stay float, or the embedding would lose its weight too."""
    ids: set[int] = set()
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def quantize_base(
    model: nn.Module,
    scheme: str,
    *,
    group_size: int | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    keep_float: bool = False,
    from_blocks: bool = False,
) -> QuantizeReport:
    """Replace every frozen ``nn.Linear`` of ``model`` by a quantized layer, in place.

    ``group_size`` (int4/nf4: default 64; int8: per row unless given) must divide each layer's
    inputs. ``exclude``: module name suffixes left float (a new classification head, say); weights
    tied to an embedding always stay float. ``keep_float`` keeps each layer's float weight beside
    its blocks until a LoftQ LoRA (``dt.LoRA(init="loftq")``) uses it, then it is dropped. Quantize
    before attaching deltas. Everything is checked before the first layer changes.
    ``from_blocks`` also converts layers already in GGUF blocks (a ``quantize="gguf"`` model), one
    dequantized layer at a time, so no float copy of the whole model is ever made.
    """
    spec = SCHEMES.get(scheme) if isinstance(scheme, str) else SCHEMES.get(str(scheme))
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise QuantizeError(f"group_size must be a positive integer, got {group_size!r}")
    if spec.fixed_group and group_size not in (None, spec.fixed_group):
        raise QuantizeError(f"{scheme} blocks hold {spec.fixed_group} values; drop group_size")
    group = group_size or spec.default_group
    if any(isinstance(m, Host) for m in model.modules()):
        raise QuantizeError("the model already has deltas attached; quantize the base first, "
                            "then attach")
    tied = _tied_ids(model)
    todo: list[tuple[str, nn.Linear]] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        blocks = from_blocks and isinstance(module, GGUFLinear)
        if type(module) is not nn.Linear and not blocks:
            continue
        if (not blocks and id(module.weight) in tied) or any(
                name == e or name.endswith("." + e) for e in exclude):
            skipped.append(name)
            continue
        todo.append((name, module))
    if not todo:
        what = "only tied or excluded ones" if skipped else "none"
        raise QuantizeError(
            f"the model has no Linear layer to quantize ({what}); quantization applies to "
            "nn.Linear weights, so drop --quantize for this model")
    if group:
        bad = [(n, m.in_features) for n, m in todo if m.in_features % group]
        if bad:
            name, n = bad[0]
            fits = [d for d in (256, 128, 64, 32, 16)
                    if all(m.in_features % d == 0 for _, m in todo)]
            hint = f"e.g. {fits[0]}" if fits else "one dividing every layer's inputs"
            raise QuantizeError(
                f"group size {group} does not divide the {n} inputs of {name!r} "
                f"({len(bad)} layer(s)); use a group size that does ({hint})")
    report = QuantizeReport(scheme, group, 0, 0, 0, skipped)
    for name, linear in todo:
        w, b = linear.weight.detach(), linear.bias  # a GGUF layer: its blocks dequantized now
        if scheme == "int8":
            q: QuantizedBase = Int8Linear(w, b, group_size)
        elif scheme in ("int4", "nf4"):
            q = GroupQuantLinear(w, b, scheme, group)
        else:
            q = GGUFLinear.from_weight(w, b, scheme.upper())
        if keep_float:
            q.float_reference = (w,)
        q.train(linear.training)
        report.float_bytes += w.numel() * w.element_size()
        report.quantized_bytes += q.storage_bytes()
        report.layers += 1
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, q)
    return report


def drop_float_references(model: nn.Module) -> int:
    """Forget the float weights kept by ``quantize_base(..., keep_float=True)``; returns how many
    layers still held one (called after attaching, so that the memory saving is real)."""
    n = 0
    for module in model.modules():
        if isinstance(module, QuantizedBase) and getattr(module, "float_reference", None):
            module.float_reference = None
            n += 1
    return n


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """Name → storage format of every quantized base layer."""
    return {n: m.format for n, m in model.named_modules() if isinstance(m, QuantizedBase)}


def quantized_bytes(model: nn.Module) -> int:
    return sum(m.storage_bytes() for m in model.modules() if isinstance(m, QuantizedBase)
               and hasattr(m, "storage_bytes"))


def float_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers that are not quantized blocks."""
    q = {id(b) for m in model.modules() if isinstance(m, QuantizedBase) for b in m.buffers()}
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(
        model.buffers()) if id(t) not in q)


__all__ = ["GGUFLinear", "GroupQuantLinear", "Int8Linear", "QuantizeError", "QuantizeReport",
           "QuantizedBase", "SCHEMES", "drop_float_references", "float_bytes", "quantize_base",
           "quantized_bytes", "quantized_layers", "requantization_errors"]
