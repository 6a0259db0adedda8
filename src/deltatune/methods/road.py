"""RoAd: 2D rotation adaptation, a trained scaled rotation of each pair of output features.

Unified view: function = ``h ↦ R·h`` with ``R`` block-diagonal in 2 × 2 blocks: within each group of
``group_size`` output features, feature ``i`` of the first half is paired with feature ``i`` of the
second half, and each pair ``(h_p, h_q)`` becomes ``(f_p·h_p − s_p·h_q, f_q·h_q + s_q·h_p)`` with
``f = α·cos θ`` and ``s = α·sin θ`` (``road_1``: one angle and scale per pair; ``road_2``: one per
feature; ``road_4``: separate angles and scales for the cosine and the sine terms); position = a
Linear layer's output (attention q/v by default); insertion = multiplicative on the output,
bias included. ``θ = 0, α = 1`` is the identity, so the model equals the base at init.

Foldable: ``R·(W·x + b) = (R·W)·x + R·b``, so merging writes ``R·W`` and ``R·b``. The change depends
on the weight, so unmerging applies ``R⁻¹``, which is again a pairwise map (each 2 × 2 block is
inverted in closed form: no dense ``out × out`` matrix and no general matrix inverse). Tensor
layout (``road_theta``, ``road_alpha``) and math follow peft 0.21.2's ``road`` tuner.

Paper: Liao et al., "3-in-1: 2D Rotary Adaptation for Efficient Finetuning, Efficient Batching and
Composability" (RoAd), NeurIPS 2024, https://arxiv.org/abs/2409.00119
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..core.delta import Delta
from ..core.example import Example
from ..core.host import DeltaHost
from ..core.peft_layout import Option, PeftLayout, init_flag, linear_only
from ..core.spec import DeltaSpec, register
from ..core.targets import ATTENTION_QV

_TENSORS = ("road_theta", "road_alpha")
#: parameters per output feature of each variant
_PER_FEATURE = {"road_1": 0.5, "road_2": 1, "road_4": 2}


@register
@dataclass(frozen=True)
class RoAd(DeltaSpec):
    """2D rotation adaptation on Linear / GPT-2 Conv1D outputs: ``variant`` (peft's ``road_1``,
    ``road_2``, ``road_4``), ``group_size`` (even; must divide each layer's output size: features
    ``i`` and ``i + group_size/2`` of a group are rotated together) and ``init="random"`` (peft's
    ``init_weights=False``: θ ~ N(0, 0.5), α ~ N(1, 0.5); for tests)."""

    method = "road"
    example = Example({"group_size": 4, "targets": ("fc1", "fc2")}, bad=(
        ({"group_size": 3}, "group_size"), ({"group_size": 0}, "group_size"),
        ({"variant": "road_3"}, "variant"), ({"init": "zeros"}, "init")))
    host_kinds = ("linear",)
    default_targets = ATTENTION_QV
    peft = PeftLayout("ROAD", tensors=_TENSORS, check=linear_only, fixed={}, options=(
        Option("variant", default="road_1"), Option("group_size", default=64),
        init_flag("identity", "random")))

    variant: Literal["road_1", "road_2", "road_4"] = "road_1"
    group_size: int = 64
    init: Literal["identity", "random"] = "identity"

    def validate(self) -> None:
        g = self.group_size
        if not isinstance(g, int) or isinstance(g, bool) or g < 2 or g % 2:
            self.fail("group_size", "must be a positive even integer (features pair up within a "
                      "group)")

    def check_host(self, host: DeltaHost, module_name: str) -> None:
        n = host.out_features
        if n % self.group_size:
            self.fail("group_size", f"must divide the {n} output features of {module_name!r}; "
                      "use a smaller group_size that divides every target's output size")

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        return RoAdDelta(self, host)


def _swap_halves(v: torch.Tensor, g: int) -> torch.Tensor:
    """``v`` (..., n) with the two halves of every group of ``g`` features exchanged."""
    return v.unflatten(-1, (-1, 2, g // 2)).flip(-2).flatten(-3)


def _rotate(m: torch.Tensor, f: torch.Tensor, s: torch.Tensor, g: int) -> torch.Tensor:
    """``R·m`` along the last dimension (n features): ``m·f + rot(m)·s``, where ``rot`` maps each
    pair ``(m_p, m_q)`` to ``(−m_q, m_p)`` (the pairwise form of peft's ``_apply_road``)."""
    halves = m.unflatten(-1, (-1, 2, g // 2))  # (..., groups, 2, g/2)
    rot = torch.stack((-halves[..., 1, :], halves[..., 0, :]), dim=-2).flatten(-3)
    return m * f + rot * s


class RoAdDelta(Delta):
    """Parameters ``road_theta`` and ``road_alpha``: (out/2,) for road_1, (out,) for road_2,
    (2·out,) for road_4, in peft's order."""

    foldable = True

    def __init__(self, spec: RoAd, host: DeltaHost) -> None:
        super().__init__(spec)
        self.fan_in_fan_out = host.fan_in_fan_out
        self.g = spec.group_size
        ref = host.weight
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        size = int(host.out_features * _PER_FEATURE[spec.variant])
        theta = torch.zeros(size, dtype=dtype, device=ref.device)
        alpha = torch.ones(size, dtype=dtype, device=ref.device)
        if spec.init == "random":
            nn.init.normal_(theta, 0.0, 0.5)
            nn.init.normal_(alpha, 1.0, 0.5)
        self.road_theta = nn.Parameter(theta)
        self.road_alpha = nn.Parameter(alpha)

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, s)``, each (out,): the cosine and sine coefficients of every output feature."""
        theta, alpha, g, variant = self.road_theta, self.road_alpha, self.g, self.spec.variant
        if variant == "road_1":  # one (θ, α) per pair: both halves of a group share them
            theta = theta.view(-1, 1, g // 2).expand(-1, 2, -1).flatten()
            alpha = alpha.view(-1, 1, g // 2).expand(-1, 2, -1).flatten()
        if variant == "road_4":  # per group: g values for the cosine terms, then g for the sine
            theta, alpha = theta.view(-1, 2, g), alpha.view(-1, 2, g)
            return ((alpha[:, 0] * theta[:, 0].cos()).flatten(),
                    (alpha[:, 1] * theta[:, 1].sin()).flatten())
        return alpha * theta.cos(), alpha * theta.sin()

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        f, s = self.coefficients()
        return _rotate(h.to(f.dtype), f, s, self.g).to(h.dtype)

    # -- weight view: R·W and R·b, rotating along the output dimension ----------------------------
    def _rotated(self, host: DeltaHost, inverse: bool) -> dict[str, torch.Tensor]:
        """The host's weight and bias after ``R`` (or ``R⁻¹``), float32, in the base's layout."""
        f, s = (t.detach().float() for t in self.coefficients())
        if inverse:  # each block [[f_p, −s_p], [s_q, f_q]] inverted in closed form
            det = f * _swap_halves(f, self.g) + s * _swap_halves(s, self.g)
            f, s = _swap_halves(f, self.g) / det, -s / det
        w = host.weight.detach().float()
        w = w if self.fan_in_fan_out else w.t()  # (in, out): output features last
        out = {"weight": _rotate(w, f, s, self.g)}
        if not self.fan_in_fan_out:
            out["weight"] = out["weight"].t()
        bias = getattr(host.base, "bias", None)
        if bias is not None:
            out["bias"] = _rotate(bias.detach().float(), f, s, self.g)
        return out

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        new = self._rotated(host, inverse=False)
        return {k: v - host.base_param(k).detach().float() for k, v in new.items()}

    @torch.no_grad()
    def merge_into(self, host: DeltaHost) -> None:
        for k, v in self._rotated(host, inverse=False).items():
            host.base_param(k).copy_(v)

    @torch.no_grad()
    def unmerge_from(self, host: DeltaHost) -> None:
        for k, v in self._rotated(host, inverse=True).items():
            host.base_param(k).copy_(v)
