"""Composite deltas: several method specs under one delta name, optionally gated.

In the unified view of He et al., MAM and UniPELT are not new functions but *compositions* of
existing ones: :class:`Unified` attaches each member spec under the same name (their changes add
up; they save, load, activate and detach together); ``gated`` adds UniPELT's gates, a learned
``σ(W_g·x + b_g)`` per token on each member's change ``Δh`` (and a learned per-layer gate on
prefixes, whose key/values are built before any layer input exists). The presets fix the members:

- :class:`MAM` — prefix tuning on attention + a scaled parallel adapter on the FFN
  (He et al., https://arxiv.org/abs/2110.04366);
- :class:`UniPELT` — gated LoRA on query/value, gated prefix tuning and a gated sequential adapter
  after the FFN (Mao et al., https://arxiv.org/abs/2110.07577).

A composite is as foldable as its least foldable member: prefixes and adapters are not, so
``dt.merge`` refuses while one is active.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.delta import Delta
from ..core.errors import SpecError
from ..core.example import Example
from ..core.host import DeltaHost, iter_hosts
from ..core.spec import DeltaSpec, register, spec_from_dict
from .bottleneck import Bottleneck, InputTap, module_dims, param_dtype
from .lora import LoRA
from .prefix import PrefixTuning


class GatedDelta(Delta):
    """UniPELT's gate around a per-host delta: ``h + σ(W_g·x + b_g)·(inner(x, h) − h)``."""

    def __init__(self, spec: DeltaSpec, inner: Delta, host: DeltaHost) -> None:
        super().__init__(spec)
        self.inner = inner
        dtype, device = param_dtype(host.base)
        self.gate = nn.Linear(module_dims(host)[0], 1, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        out = self.inner(x, h, host)
        # (..., 1): one gate per token, from the host's input
        g = torch.sigmoid(self.gate(x.to(self.gate.weight.dtype))).to(h.dtype)
        return h + g * (out - h)

    def release(self, host: DeltaHost) -> None:
        self.inner.release(host)

    def after_load(self, host: DeltaHost) -> None:
        self.inner.after_load(host)


@dataclass(frozen=True)
class _Composite(DeltaSpec):
    """Shared behaviour of composite specs: subclasses say which members and whether gated."""

    host_kinds = ("linear", "conv", "embedding", "other")

    def member_specs(self) -> tuple[DeltaSpec, ...]:
        raise NotImplementedError

    def is_gated(self) -> bool:
        return False

    def validate(self) -> None:
        for field in ("targets", "target_regex", "exclude", "target_types"):
            if getattr(self, field):
                self.fail(field, "is not used by a composite; set positions on its member specs")
        try:
            members = self.member_specs()
        except SpecError as exc:  # a preset's knob is out of range: say which preset
            raise SpecError(f"{type(self).__name__}: {exc}") from None
        if not members:
            self.fail("members", "must hold at least one method spec")
        for m in members:
            if isinstance(m, _Composite) or not isinstance(m, DeltaSpec):
                raise SpecError(
                    f"{type(self).__name__}.members must be method specs (not composites), "
                    f"got {type(m).__name__}"
                )
            if m.trainable_modules:
                raise SpecError(
                    f"{type(self).__name__}.trainable_modules belong on the composite, not on its "
                    f"member {type(m).__name__}"
                )

    def inject(self, model: nn.Module, name: str) -> list[str]:
        # a composition of members that may not be host deltas (prefix tuning): why it injects
        # itself
        paths: list[str] = []
        for member in self.member_specs():
            paths += [p for p in member.inject(model, name) if p not in paths]
        for _, host in list(iter_hosts(model)):
            if name not in host.delta_names():
                continue
            part = host.part(name)
            # taps only record inputs: nothing to gate there
            gate = self.is_gated() and isinstance(host, DeltaHost)
            if gate and not isinstance(part, InputTap):
                part = host.deltas[name] = GatedDelta(self, part, host)
            part.spec = self  # saving and loading go through the composite
        return paths

    def without_projection(self) -> "Unified":
        """The equivalent :class:`Unified` spec with the prefix's reparameterisation MLP dropped."""
        members = tuple(
            m.without_projection() if isinstance(m, PrefixTuning) else m
            for m in self.member_specs()
        )
        return Unified(members=members, gated=self.is_gated(),
                       trainable_modules=self.trainable_modules)


@register
@dataclass(frozen=True)
class Unified(_Composite):
    """Any composition: ``members`` (specs or their ``to_dict()`` forms); ``gated`` as UniPELT."""

    method = "unified"
    example = Example(dict(members=(LoRA(r=2), Bottleneck(style="pfeiffer", reduction_factor=4)),
                           gated=True), model="transformer", merges=False,
                      bad=(({"members": ()}, "members"), ({"targets": ("x",)}, "targets")))

    members: tuple[Any, ...] = ()
    gated: bool = False

    def validate(self) -> None:
        # Saved configs hold members as dicts: rebuild them (their own validation runs).
        rebuilt = tuple(spec_from_dict(m) if isinstance(m, dict) else m for m in self.members)
        object.__setattr__(self, "members", rebuilt)
        super().validate()

    def member_specs(self) -> tuple[DeltaSpec, ...]:
        return self.members

    def is_gated(self) -> bool:
        return self.gated

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["members"] = [m.to_dict() for m in self.members]
        return out


@register
@dataclass(frozen=True)
class MAM(_Composite):
    """Mix-and-match adapter: prefix tuning (``num_virtual_tokens``) + parallel adapter on the FFN
    (``reduction_factor``, fixed ``scaling``), the paper's best setting being 30 tokens, s = 4 and a
    wide adapter (bottleneck 512 on 1024-wide models, i.e. reduction 2)."""

    method = "mam"
    example = Example(dict(num_virtual_tokens=3, reduction_factor=4), model="transformer",
                      identity_at_init=False, merges=False, bad=(({"targets": ("x",)}, "targets"),))

    num_virtual_tokens: int = 30
    prefix_projection: bool = False
    reduction_factor: float = 2.0
    scaling: float = 4.0

    def member_specs(self) -> tuple[DeltaSpec, ...]:
        return (
            PrefixTuning(num_virtual_tokens=self.num_virtual_tokens,
                         projection=self.prefix_projection),
            Bottleneck(style="parallel", reduction_factor=self.reduction_factor,
                       scaling=self.scaling),
        )


@register
@dataclass(frozen=True)
class UniPELT(_Composite):
    """UniPELT: gated LoRA (``r``, ``alpha``; query/value), gated prefix
    (``num_virtual_tokens``) and a gated Pfeiffer adapter (``reduction_factor``); the paper uses
    r = 8, 10 tokens and bottleneck 48 on 768-wide models (reduction 16)."""

    method = "unipelt"
    example = Example(dict(r=2, num_virtual_tokens=3, reduction_factor=4), model="transformer",
                      identity_at_init=False, merges=False, bad=(({"exclude": ("x",)}, "exclude"),))

    r: int = 8
    alpha: float = 16.0
    num_virtual_tokens: int = 10
    reduction_factor: float = 16.0

    def member_specs(self) -> tuple[DeltaSpec, ...]:
        return (
            LoRA(r=self.r, alpha=self.alpha),
            PrefixTuning(num_virtual_tokens=self.num_virtual_tokens, gate=True),
            Bottleneck(style="pfeiffer", reduction_factor=self.reduction_factor),
        )

    def is_gated(self) -> bool:
        return True
