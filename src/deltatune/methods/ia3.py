"""(IA)³: learned vectors that rescale activations.

Unified view: function = a scaling vector ``l``; position = attention keys and values (scaling the
layer's *output*, ``h' = l ⊙ h``) and the second FFN linear (scaling its *input*,
``h' = W·(l ⊙ x) + b``, peft's ``feedforward_modules``); insertion = multiplicative on the weights:
``diag(l)·W`` (and ``l ⊙ b``) or ``W·diag(l)``. Foldable; unmerge divides by ``l`` again (exact to
float rounding, so a vector with entries at 0 cannot be unmerged and merging it is refused).

Paper: Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", NeurIPS 2022, https://arxiv.org/abs/2205.05638
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
from torch import nn

from ..core.delta import Delta
from ..core.errors import DeltaFileError, StateError, TargetError
from ..core.example import Example
from ..core.host import DeltaHost, Host
from ..core.peft_layout import PeftLayout, PeftTensor
from ..core.spec import DeltaSpec, register
from ..core.targets import name_matches

#: the second FFN linear of common architectures (BERT, Llama/Mistral, GPT-2, OPT/ViT, T5, GPT-NeoX)
DEFAULT_FEEDFORWARD = ("output.dense", "down_proj", "mlp.c_proj", "fc2", "wo", "dense_4h_to_h")


def _peft_vector(delta: Any, host: Host, vec: torch.Tensor) -> torch.Tensor:
    return vec.reshape(delta.peft_shape(host))


def _vector(delta: Any, host: Host, value: torch.Tensor) -> torch.Tensor:
    if tuple(value.shape) != delta.peft_shape(host):
        kind = "input (feedforward)" if delta.feedforward else "output"
        raise DeltaFileError(
            f"peft IA3 vector of shape {tuple(value.shape)} does not fit {kind} scaling "
            f"{delta.peft_shape(host)}; check feedforward_modules in adapter_config.json"
        )
    return value.flatten()


def _write_feedforward(spec: DeltaSpec, deltas: dict[str, Any]) -> dict[str, Any]:
    return {"feedforward_modules": sorted(p for p, d in deltas.items() if d.feedforward)}


def _read_feedforward(config: Mapping[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    ff = config.get("feedforward_modules") or ()
    # peft matches a list by plain `endswith` (no dot boundary) and a string as a full regex.
    chosen = [
        t
        for t in kw["targets"]
        if (re.fullmatch(ff, t) if isinstance(ff, str) else any(t.endswith(f) for f in ff))
    ]
    return {"feedforward": tuple(chosen)}


@register
@dataclass(frozen=True)
class IA3(DeltaSpec):
    """(IA)³ on keys, values and the FFN output layer.

    ``feedforward``: names/suffixes of the targets whose *input* is scaled (peft's
    ``feedforward_modules``); ``None`` uses the usual FFN output layer names, ``()`` none.
    ``init="identity"`` (all ones) starts at the base model; ``"random"`` (standard normal, peft's
    ``init_ia3_weights=False``) is for tests.
    """

    method = "ia3"
    example = Example(dict(targets=("fc1", "fc2", "head"), feedforward=("fc2",)),
                      bad=(({"init": "zeros"}, "init"), ({"feedforward": ("",)}, "feedforward")))
    host_kinds = ("linear", "conv")
    default_targets = (
        ("key", "value", "output.dense"),
        ("k_proj", "v_proj", "down_proj"),
        ("c_attn", "mlp.c_proj"),
        ("k", "v", "wo"),
    )
    peft = PeftLayout(
        "IA3", tensors=(PeftTensor("ia3_l", save=_peft_vector, load=_vector),),
        write=_write_feedforward, read=_read_feedforward, fan_in_fan_out=True, refuse={},
        fixed={"exclude_modules": None, "init_ia3_weights": True})

    feedforward: tuple[str, ...] | None = None
    init: Literal["identity", "random"] = "identity"

    def validate(self) -> None:
        if isinstance(self.feedforward, str):
            object.__setattr__(self, "feedforward", (self.feedforward,))
        if self.feedforward is not None and not all(
            isinstance(p, str) and p for p in self.feedforward
        ):
            self.fail("feedforward", "must be a list of module names or suffixes")

    def is_feedforward(self, path: str) -> bool:
        patterns = DEFAULT_FEEDFORWARD if self.feedforward is None else self.feedforward
        return any(name_matches(path, p) for p in patterns)

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        ff = self.is_feedforward(module_name)
        if ff and host.kind == "conv" and host.base.padding_mode != "zeros":
            raise TargetError(f"IA3 cannot scale the input of {module_name!r} (padding_mode="
                              f"{host.base.padding_mode!r}); leave it out of `feedforward`")
        return IA3Delta(self, host, ff)


class IA3Delta(Delta):
    """``l ⊙ h`` (output scaling) or ``h + W·((l − 1) ⊙ x)`` (input scaling; the same as
    ``W·(l ⊙ x) + b`` but it leaves the output of other deltas on the layer alone)."""

    foldable = True

    def __init__(self, spec: IA3, host: DeltaHost, feedforward: bool) -> None:
        super().__init__(spec)
        self.feedforward = feedforward
        self.fan_in_fan_out = host.fan_in_fan_out
        self.kind = host.kind
        n = host.in_features if feedforward else host.out_features
        ref = host.weight
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        self.ia3_l = nn.Parameter(torch.ones(n, dtype=dtype, device=ref.device))
        if spec.init == "random":
            nn.init.normal_(self.ia3_l)

    def _channels(self, like: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        return vec.view(1, -1, *([1] * (like.dim() - 2))) if self.kind == "conv" else vec

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        if not self.feedforward:
            return (h * self._channels(h, self.ia3_l)).to(h.dtype)
        scaled = x.to(self.ia3_l.dtype) * self._channels(x, self.ia3_l - 1)
        return h + _weight_only(host, scaled.to(x.dtype)).to(h.dtype)

    def _weight_factor(self, host: DeltaHost, vec: torch.Tensor) -> torch.Tensor:
        """``vec`` shaped to multiply the base weight (its rows for output, columns for input
        scaling)."""
        w = host.weight
        if self.kind == "linear":
            out_axis = 1 if self.fan_in_fan_out else 0
            axis = 1 - out_axis if self.feedforward else out_axis
            return vec.view(-1, 1) if axis == 0 else vec.view(1, -1)
        tail = [1] * (w.dim() - 2)
        if not self.feedforward:
            return vec.view(-1, 1, *tail)
        groups = (
            host.base.groups
        )  # weight (out, in/groups, k...): input channel of row o is in o's group
        per_in, per_out = w.shape[1], w.shape[0] // groups
        return (
            vec.view(groups, 1, per_in)
            .expand(groups, per_out, per_in)
            .reshape(w.shape[0], per_in, *tail)
        )

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        vec = self.ia3_l.detach()
        out = {"weight": host.weight.detach().to(vec.dtype) * self._weight_factor(host, vec - 1)}
        bias = getattr(host.base, "bias", None)
        if not self.feedforward and bias is not None:
            out["bias"] = bias.detach().to(vec.dtype) * (vec - 1)
        return out

    @torch.no_grad()
    def merge_into(self, host: DeltaHost) -> None:
        if (self.ia3_l == 0).any():
            raise StateError(
                "an IA3 vector has entries equal to 0; merging it could not be undone, "
                "keep it unmerged"
            )
        self._scale_base(host, self.ia3_l)

    @torch.no_grad()
    def unmerge_from(self, host: DeltaHost) -> None:
        self._scale_base(host, 1.0 / self.ia3_l)

    def _scale_base(self, host: DeltaHost, vec: torch.Tensor) -> None:
        w = host.weight
        w.mul_(self._weight_factor(host, vec).to(w.dtype))
        bias = getattr(host.base, "bias", None)
        if not self.feedforward and bias is not None:
            bias.mul_(vec.to(bias.dtype))

    def peft_shape(self, host: DeltaHost) -> tuple[int, ...]:
        """peft's shape of ``ia3_l``: (out, 1) for output scaling, (1, in) for input scaling;
        convolutions add 1s."""
        n = self.ia3_l.numel()
        if self.kind == "conv":
            return (1, n) + (1,) * (host.weight.dim() - 2)
        return (1, n) if self.feedforward else (n, 1)


def _weight_only(host: DeltaHost, x: torch.Tensor) -> torch.Tensor:
    """The base layer applied to ``x`` without its bias."""
    b = host.base
    if host.kind == "conv":
        return host.conv(x, b.weight)
    w = b.weight.t() if host.fan_in_fan_out else b.weight
    return torch.nn.functional.linear(x, w)
