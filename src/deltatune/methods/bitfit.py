"""BitFit: train only the biases.

Unified view: function = a constant vector ``b`` per layer; position = every layer that has a bias
(Linear, GPT-2 Conv1D, Conv, norm layers), or the ones the selectors pick (the paper's smallest
variant tunes only the query and the first FFN biases); insertion = parallel, ``h + b``. Foldable:
merging adds ``b`` to the layer's own bias. The original bias tensors are never modified; the
trained shift lives in the delta (the :class:`~deltatune.methods.bias.BiasDelta` shared with
``LoRA(bias="all")``).

Paper: Ben Zaken et al., "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models", ACL 2022, https://arxiv.org/abs/2106.10199
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.delta import Delta
from ..core.example import Example
from ..core.host import DeltaHost, module_kind
from ..core.spec import DeltaSpec, register
from .bias import BiasDelta
from .lntuning import is_norm


def has_output_bias(module: nn.Module) -> bool:
    """A bias that is added to the module's output (so a shift of it is an output shift)."""
    bias = getattr(module, "bias", None)
    if not isinstance(bias, nn.Parameter):
        return False
    return module_kind(module) in ("linear", "conv") or is_norm(module)


@register
@dataclass(frozen=True)
class BitFit(DeltaSpec):
    """Bias-only tuning. With no selector every bias of a Linear / Conv1D / Conv / norm layer
    trains; ``targets=["query", "intermediate.dense"]`` gives the paper's two-bias variant."""

    method = "bitfit"
    example = Example(bad=(({"target_regex": "("}, "target_regex"),))
    host_kinds = ("linear", "conv", "other")
    default_scope = "every"
    host_what = "layer with a bias"

    def can_host(self, module: nn.Module) -> bool:
        return has_output_bias(module)

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        return BiasDelta(self, host)

