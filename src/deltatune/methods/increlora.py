"""IncreLoRA: SVD-form LoRA that starts small and grows rank-1 triplets where they matter most.

Function and insertion as AdaLoRA (:mod:`deltatune.methods.adalora`): ``h + s·P·diag(λ⊙m)·Q·x``,
with a *gated* mask ``m``: only live triplets contribute and get gradients. Every module starts with
``init_r`` live triplets out of ``max_r`` preallocated ones; the schedule in
:mod:`deltatune.methods.increlora_schedule` adds rank-1 triplets every ``delta_t`` steps to the
modules with the highest importance (smoothed sensitivity × uncertainty, as AdaLoRA) until the
parameter budget is spent. Preallocating means the optimizer keeps working unchanged when ranks
grow: a new triplet's parameters were always there (with zero gradients, hence zero Adam moments);
its ``λ`` is zero when it is switched on, so the output does not jump. Live parameters, not
preallocated ones, are what the budget counts (``rank × (in + out + 1)`` per module). The scaling
``s = alpha / max_r`` is fixed, so growing a rank never rescales the others.

Paper: Zhang et al., "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient
Fine-tuning", https://arxiv.org/abs/2308.12043
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..core.delta import Delta
from ..core.example import Example
from ..core.host import DeltaHost, get_module
from ..core.spec import DeltaSpec, register
from ..core.targets import ATTENTION_QV
from .adalora import SVDDelta, _is_int, _SVDSpecMixin


def _as_host(module: nn.Module) -> DeltaHost:
    return module if isinstance(module, DeltaHost) else DeltaHost(module)


def triplet_cost(host: DeltaHost) -> int:
    """Parameters of one rank-1 triplet on ``host``: a row of Q, a column of P and one λ."""
    return host.in_features + host.out_features + 1


@register
@dataclass(frozen=True)
class IncreLoRA(_SVDSpecMixin, DeltaSpec):
    """Incrementally grown SVD-form LoRA (train with :class:`deltatune.budget.IncreLoRASchedule`).

    ``budget``: live parameters over all modules (``None``: ``target_r`` triplets' worth per
    module); ``grow_per_step`` modules gain one triplet at each allocation (every ``delta_t`` steps
    between ``tinit`` and ``total_step - tfinal``)."""

    method = "increlora"
    example = Example(dict(init_r=1, max_r=3, target_r=2, targets=("fc1", "fc2")), bad=(
        ({"init_r": 0}, "init_r"), ({"budget": -5}, "budget"),
        ({"grow_per_step": 0}, "grow_per_step")))
    host_kinds = ("linear",)
    default_targets = ATTENTION_QV

    init_r: int = 1
    max_r: int = 8
    target_r: int = 4
    budget: int | None = None
    grow_per_step: int = 1
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    total_step: int | None = None

    def validate(self) -> None:
        if not _is_int(self.max_r) or self.max_r < 1:
            self.fail("max_r", "must be a positive integer (triplets preallocated per module)")
        if not _is_int(self.init_r) or not 1 <= self.init_r <= self.max_r:
            self.fail(
                "init_r", f"must be an integer in [1, max_r={self.max_r}] (the starting rank)"
            )
        if not _is_int(self.target_r) or not self.init_r <= self.target_r <= self.max_r:
            self.fail(
                "target_r", f"must be an integer in [init_r={self.init_r}, max_r={self.max_r}]"
            )
        if self.budget is not None and (not _is_int(self.budget) or self.budget < 1):
            self.fail(
                "budget", "must be a positive number of parameters, or None for target_r per module"
            )
        if not _is_int(self.grow_per_step) or self.grow_per_step < 1:
            self.fail("grow_per_step", "must be a positive integer")
        self._check_common()

    def capacity(self) -> int:
        return self.max_r

    def start_rank(self) -> int:
        return self.init_r

    def scaling(self) -> float:
        return self.alpha / self.max_r

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        return GatedSVDDelta(self, host, module_name)

    def training_callbacks(self, name: str, total_steps: int) -> list[Any]:
        """IncreLoRA's growth schedule over the run (the spec's ``total_step`` wins when set)."""
        # the schedule's module imports this one: import it when it is needed
        from .increlora_schedule import IncreLoRASchedule

        return [IncreLoRASchedule(name, total_step=self.total_step or total_steps)]

    def budget_for(self, costs: dict[str, int]) -> int:
        """The live-parameter budget given each module's rank-1 cost."""
        return self.budget if self.budget is not None else self.target_r * sum(costs.values())

    def check_targets(self, model: nn.Module, paths: list[str]) -> None:
        costs = {p: triplet_cost(_as_host(get_module(model, p))) for p in paths}
        budget, start = self.budget_for(costs), self.init_r * sum(costs.values())
        problem = None
        if budget < min(costs.values()):
            problem = f"is smaller than one rank-1 delta here ({min(costs.values()):,} parameters)"
        elif budget < start:
            problem = (f"is smaller than the starting ranks (init_r={self.init_r} on {len(paths)} "
                       f"modules: {start:,} parameters)")
        if problem:
            field = "budget" if self.budget is not None else "target_r"
            self.fail(field, f"gives a budget of {budget:,} parameters, which " + problem
                      + "; give a larger budget, fewer targets or a smaller init_r")


class GatedSVDDelta(SVDDelta):
    """IncreLoRA's delta: λ multiplied by the live mask in the forward pass."""

    gated: ClassVar[bool] = True
