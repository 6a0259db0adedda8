"""HRA: Householder reflection adaptation, ``W' = W·H`` with ``H`` a product of ``r`` reflections.

Unified view: function = an orthogonal map ``H = H_0·H_1···H_{r−1}`` of the weight's input space,
``H_i = I − 2·u_i·u_iᵀ`` with ``u_i`` the normalised columns of the trained ``hra_u`` (n × r), or,
with ``gram_schmidt``, one reflection ``I − 2·Q·Qᵀ`` across the span of the orthonormalised columns
``Q``; position = Linear / GPT-2 Conv1D / convolution layers (for a convolution, its flattened
filter ``in/groups × kernel`` is reflected); insertion = multiplicative on the weights. Pairs of
equal columns cancel (``H_i·H_i = I``), so the ``"symmetric"`` init starts at the base model.

Foldable: merging writes ``W·H``; unmerging multiplies by ``H⁻¹ = H_{r−1}···H_0`` (each reflection
is its own inverse), so it is exact to float rounding. The unmerged forward of a Linear layer
reflects the *input* instead, ``h + (x·Hᵀ − x)·Wᵀ``, which never forms an n × n matrix.

Paper: Yuan et al., "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation", NeurIPS 2024, https://arxiv.org/abs/2405.17484
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import Delta
from ..core.errors import TargetError
from ..core.example import Example
from ..core.host import DeltaHost
from ..core.peft_layout import Option, PeftLayout, init_flag
from ..core.spec import DeltaSpec, register
from ..core.targets import ATTENTION_QV


def _filter_size(host: DeltaHost) -> int:
    """Length of one row of the weight in (out, features) form: in, or in/groups × kernel."""
    if host.kind == "conv":
        return host.base.weight[0].numel()
    return host.in_features


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns from the columns of ``u`` (n, r), in order (modified Gram-Schmidt, as
    peft computes them: the same ``Q`` even where the columns are nearly dependent)."""
    cols: list[torch.Tensor] = []
    for i in range(u.shape[1]):
        v = u[:, i]
        for q in cols:
            v = v - (q @ v) * q
        cols.append(v / v.norm())
    return torch.stack(cols, dim=1)


def _peft_check(spec: DeltaSpec, deltas: dict[str, Delta]) -> str:
    refused = [(p, d.peft_refusal) for p, d in deltas.items() if d.peft_refusal]
    return f"peft's HRA cannot hold {refused[0][0]!r} ({refused[0][1]})" if refused else ""


def _read_init(config: Mapping[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    # the init only matters before training: the file's tensors replace it
    symmetric = config.get("init_weights", True) and kw["r"] % 2 == 0 and not kw["gram_schmidt"]
    return {"init": "symmetric" if symmetric else "random"}


@register
@dataclass(frozen=True)
class HRA(DeltaSpec):
    """Householder reflection adaptation: ``r`` trained reflections per layer (peft's ``r``);
    ``gram_schmidt`` (peft's ``apply_GS``) orthonormalises them into one reflection across an
    r-dimensional subspace. ``init="symmetric"`` (pairs of equal columns: the base model; needs an
    even ``r``, peft's ``init_weights=True``) or ``"random"`` (Kaiming-uniform columns)."""

    method = "hra"
    example = Example({"r": 2, "targets": ("fc1", "fc2")}, bad=(
        ({"r": 0}, "r"), ({"r": 3}, "r"), ({"gram_schmidt": True}, "gram_schmidt"),
        ({"init": "zeros"}, "init")))
    host_kinds = ("linear", "conv")
    host_what = "Linear / GPT-2 Conv1D / Conv1d/2d/3d modules"
    default_targets = ATTENTION_QV
    peft = PeftLayout("HRA", tensors=("hra_u",), check=_peft_check, read=_read_init, options=(
        Option("r", default=8), Option("apply_GS", "gram_schmidt", False),
        init_flag("symmetric", "random", read=False)))

    r: int = 8
    gram_schmidt: bool = False
    init: Literal["symmetric", "random"] = "symmetric"

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            self.fail("r", "must be a positive integer (reflections per layer)")
        if self.init == "symmetric" and self.gram_schmidt:
            self.fail("gram_schmidt", "cannot start at the identity (I − 2QQᵀ ≠ I for r >= 1); "
                      "use init='random' with it")
        if self.init == "symmetric" and self.r % 2:
            self.fail("r", "must be even with init='symmetric' (equal pairs of reflections "
                      "cancel); use an even r or init='random'")

    def check_host(self, host: DeltaHost, module_name: str) -> None:
        n = _filter_size(host)
        if self.r > n:
            self.fail("r", f"exceeds the {n} input features of {module_name!r} (any rotation of "
                      f"them is a product of at most {n} reflections); use r <= {n}")
        if host.kind == "conv" and host.base.padding_mode != "zeros":
            raise TargetError(f"HRA needs zero padding at {module_name!r} "
                              f"(padding_mode={host.base.padding_mode!r}); exclude it")

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        return HRADelta(self, host)


class HRADelta(Delta):
    """``hra_u`` (n, r): the reflection vectors as columns (peft's layout), normalised when used."""

    foldable = True

    def __init__(self, spec: HRA, host: DeltaHost) -> None:
        super().__init__(spec)
        self.fan_in_fan_out = host.fan_in_fan_out
        self.conv = host.kind == "conv"
        n, r = _filter_size(host), spec.r
        if spec.init == "symmetric":  # each column twice: H_{2k}·H_{2k+1} = I
            half = torch.empty(n, r // 2)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u = torch.repeat_interleave(half, 2, dim=1)
        else:
            u = nn.init.kaiming_uniform_(torch.empty(n, r), a=math.sqrt(5))
        self.hra_u = nn.Parameter(u)
        self.peft_refusal = _peft_refusal(host)  # why peft's HRA could not hold it ("" if it can)

    def reflect(self, m: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """``m·H`` (or ``m·H⁻¹``) for ``m`` of shape (..., n), in float32."""
        m, u = m.float(), self.hra_u.float()
        if self.spec.gram_schmidt:  # one symmetric involution: H = H⁻¹
            q = gram_schmidt(u)
            return m - 2 * (m @ q) @ q.t()
        u = u / u.norm(dim=0)
        order = range(u.shape[1] - 1, -1, -1) if inverse else range(u.shape[1])
        for i in order:  # m·H_i = m − 2·(m·u_i)·u_iᵀ
            m = m - 2 * (m @ u[:, i]).unsqueeze(-1) * u[:, i]
        return m

    def _w(self, host: DeltaHost) -> torch.Tensor:
        """The host's weight as (out, features), float32."""
        w = host.weight.t() if self.fan_in_fan_out else host.weight
        return w.reshape(w.shape[0], -1).float()

    def _layout(self, w: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        return w.t() if self.fan_in_fan_out else w.reshape(host.weight.shape)

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        if self.conv:
            w = self._w(host)
            change = (self.reflect(w) - w).view(host.weight.shape).to(x.dtype)
            return h + host.conv(x, change).to(h.dtype)
        # x·(W·H)ᵀ = (x·Hᵀ)·Wᵀ and Hᵀ = H⁻¹: reflect the input, not the weight
        moved = (self.reflect(x, inverse=True) - x.float()).to(host.weight.dtype)
        weight = host.weight.t() if self.fan_in_fan_out else host.weight
        return h + F.linear(moved, weight).to(h.dtype)

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        w = self._w(host)
        return {"weight": self._layout(self.reflect(w) - w, host).detach()}

    @torch.no_grad()
    def merge_into(self, host: DeltaHost) -> None:
        host.weight.copy_(self._layout(self.reflect(self._w(host)), host))

    @torch.no_grad()
    def unmerge_from(self, host: DeltaHost) -> None:
        host.weight.copy_(self._layout(self.reflect(self._w(host), inverse=True), host))


def _peft_refusal(host: DeltaHost) -> str:
    """Why peft's HRA layers cannot hold this host ("" when they can: Linear, or a Conv2d with one
    group and a square kernel, whose filter peft flattens as in × k × k)."""
    base = host.base
    if host.fan_in_fan_out:
        return "a GPT-2 Conv1D; peft's HRA takes Linear and Conv2d"
    if host.kind != "conv":
        return ""
    if not isinstance(base, nn.Conv2d):
        return f"a {type(base).__name__}; peft's HRA takes Linear and Conv2d"
    if base.groups != 1 or base.kernel_size[0] != base.kernel_size[1]:
        return "a grouped or non-square Conv2d"
    # peft's unmerged conv forward passes stride[0] and padding[0] only, and no dilation
    padding, stride = base.padding, base.stride
    uneven = isinstance(padding, str) or len(set(padding)) > 1 or len(set(stride)) > 1
    if uneven or set(base.dilation) != {1}:
        return "a Conv2d with uneven stride or padding, or dilation, which peft's forward ignores"
    return ""
