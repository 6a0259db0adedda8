"""deltatune: adapt frozen pretrained models through parameter deltas.

    import deltatune as dt
    dt.attach(model, dt.LoRA(r=8, alpha=16, targets=["query", "value"]), name="default")
    dt.save_adapter(model, "out/adapter", name="default", format="peft")
"""

from __future__ import annotations

from . import compress as _compress  # noqa: F401  registers how io reads compressed adapters
from .core import (
    DeltaError,
    DeltaFileError,
    DeltaSpec,
    SpecError,
    StateError,
    TargetError,
    TrainableSummary,
    active,
    attach,
    delta_names,
    detach,
    disabled,
    get_spec,
    merge,
    requantization_errors,
    route,
    set_active,
    trainable_summary,
    unmerge,
)
from .io import load_adapter, read_adapter_info, save_adapter
from .methods import *  # noqa: F401,F403  (every registered method spec: LoRA, ...)
from .methods import __all__ as _method_names

__version__ = "0.1.0"


def quantize_base(model, scheme: str, *, group_size: int | None = None, exclude=(),
                  keep_float: bool = False):
    """Keep the frozen Linear weights quantized (int8, int4, nf4, q8_0, q4_0, q4_1): see
    :func:`deltatune.quant.quantize_base` and docs/quantization.md."""
    from .quant import quantize_base as quantize

    return quantize(model, scheme, group_size=group_size, exclude=exclude, keep_float=keep_float)


def to_lora(
    model,
    name: str = "default",
    *,
    rank: int = 8,
    lora_name: str | None = None,
    activate: bool = True,
):
    """Any foldable delta as a LoRA (truncated SVD of each layer's weight change), with its relative
    error: see :func:`deltatune.algebra.to_lora.to_lora`."""
    from .algebra.to_lora import to_lora as convert

    return convert(model, name, rank=rank, lora_name=lora_name, activate=activate)


__all__ = [
    "DeltaError", "DeltaFileError", "DeltaSpec", "SpecError", "StateError", "TargetError",
    "TrainableSummary", "active", "attach", "delta_names", "detach", "disabled", "get_spec",
    "load_adapter", "merge", "quantize_base", "read_adapter_info", "requantization_errors",
    "route", "save_adapter", "set_active",
    "to_lora", "trainable_summary", "unmerge", *_method_names,
]
