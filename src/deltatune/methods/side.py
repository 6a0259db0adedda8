"""Side tuning with a ladder side network (LST).

A small network runs *beside* the frozen backbone: rung ``i`` takes the backbone's layer-``i``
output, **detached** (no gradient ever flows back through the backbone, which is where LST saves
its memory), down-projects it by ``reduction_factor`` and mixes it with the side state of rung
``i−1`` through a learned ladder gate ``μ_i = σ(α_i)``: ``z_i = μ_i·down_i(h_i) + (1−μ_i)·z_{i−1}``,
then a residual feed-forward block. The last rung up-projects the side state and adds it to the
backbone's last layer output through a learned per-channel gate, ``h_L + g ⊙ up(LN(z_L))``; ``up``
starts at zero, so the model equals its base at init. Rungs live in hosts around the backbone's
blocks (one per layer), so save/load, activation and routing work as for every other delta;
nothing folds into weights. deltatune's side blocks are feed-forward (the paper's side network
also has reduced attention blocks).

Paper: Sung et al., https://arxiv.org/abs/2206.06522
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..core.delta import Delta
from ..core.errors import TargetError
from ..core.example import Example
from ..core.host import DeltaHost, get_module
from ..core.spec import DeltaSpec, Site, register
from ..core.targets import iter_candidates
from .bottleneck import ACTIVATIONS, module_dims, param_dtype


@register
@dataclass(frozen=True)
class SideTuning(DeltaSpec):
    """Ladder side network over the blocks of ``layers`` (a ModuleList name; default: the model's
    longest ModuleList, e.g. ``encoder.layer`` or ``model.layers``); side width = hidden /
    ``reduction_factor``."""

    method = "side"
    example = Example(dict(reduction_factor=4), model="transformer", merges=False,
                      bad=(({"reduction_factor": 0}, "reduction_factor"),))
    host_kinds = ("other",)

    reduction_factor: float = 8.0
    nonlinearity: Literal["relu", "gelu", "swish", "tanh"] = "gelu"
    layers: str | None = None

    def validate(self) -> None:
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 0:
            self.fail("reduction_factor", "must be > 0 (side width = hidden width / factor)")

    def block_paths(self, model: nn.Module) -> list[str]:
        lists = {n: m for n, m in iter_candidates(model) if isinstance(m, nn.ModuleList) and len(m)}
        if self.layers is not None:
            if self.layers not in lists:
                raise TargetError(
                    f"SideTuning.layers={self.layers!r} is not a ModuleList of the model; "
                    f"lists here: {sorted(lists) or 'none'}"
                )
            path = self.layers
        elif lists:
            path = max(lists, key=lambda n: len(lists[n]))  # the backbone's blocks: longest list
        else:
            raise TargetError(
                "SideTuning found no ModuleList of blocks in the model; pass layers='<its name>'"
            )
        return [f"{path}.{i}" for i in range(len(lists[path]))]

    def sites(self, model: nn.Module) -> list[Site]:
        """One rung per backbone block, all sharing the ladder that carries the side state from rung
        to rung (its first rung starts it, its last one merges it back): a chain of sites."""
        paths = self.block_paths(model)
        hidden = module_dims(get_module(model, paths[0]))[1]
        width = int(hidden // self.reduction_factor)
        if width < 1:
            self.fail("reduction_factor", f"leaves no side width for hidden width {hidden}")
        if width > hidden:
            self.fail(
                "reduction_factor",
                f"makes the side network {width} wide, wider than the backbone's "
                f"{hidden} at {paths[0]!r}; use reduction_factor >= 1",
            )
        ladder = _Ladder()
        return [Site(path, lambda host, p, first=i == 0, last=i == len(paths) - 1: SideRung(
                    self, host, ladder, hidden, width, first=first, last=last), check=False)
                for i, path in enumerate(paths)]


class _Ladder:
    """The side state passed from rung to rung during one forward (plain object, not a module)."""

    state: torch.Tensor | None = None


class SideRung(Delta):
    """One rung of the ladder; the last one also merges the side output into the backbone's."""

    def __init__(
        self, spec: SideTuning, host: DeltaHost, ladder: _Ladder, hidden: int, width: int, *,
        first: bool, last: bool,
    ) -> None:
        super().__init__(spec)
        dtype, device = param_dtype(host.base)
        kw = {"dtype": dtype, "device": device}
        self.ladder, self.first, self.last = ladder, first, last
        self.down = nn.Linear(hidden, width, **kw)
        # Ladder gate logit α (the mix starts at μ = σ(0) = 0.5); rung 0 has nothing to mix with.
        self.mix = None if first else nn.Parameter(torch.zeros((), **kw))
        self.block = nn.Sequential(
            nn.LayerNorm(width, **kw), nn.Linear(width, 4 * width, **kw),
            ACTIVATIONS[spec.nonlinearity](), nn.Linear(4 * width, width, **kw),
        )
        if last:
            self.norm = nn.LayerNorm(width, **kw)
            self.up = nn.Linear(width, hidden, **kw)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
            self.out_gate = nn.Parameter(torch.ones(hidden, **kw))

    def forward(self, x: torch.Tensor, h, host: DeltaHost):
        hb = h[0] if isinstance(h, tuple) else h
        # detach: the side network never backpropagates into the frozen backbone
        feat = self.down(hb.detach().to(self.down.weight.dtype))
        prev = self.ladder.state
        if self.mix is None or prev is None:
            z = feat
        else:
            mu = torch.sigmoid(self.mix)
            z = mu * feat + (1 - mu) * prev
        z = z + self.block(z)
        if not self.last:
            self.ladder.state = z
            return h
        self.ladder.state = None
        out = hb + (self.out_gate * self.up(self.norm(z))).to(hb.dtype)
        return (out, *h[1:]) if isinstance(h, tuple) else out
