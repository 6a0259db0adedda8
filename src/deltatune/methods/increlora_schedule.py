"""IncreLoRA's growth schedule as a trainer callback; it lives with its method (increlora.py).

Every ``delta_t`` steps after ``tinit`` (and up to ``total_step − tfinal`` when the run's length is
known), the ``grow_per_step`` modules with the highest importance — the mean score of their live
triplets, scored as in AdaLoRA (smoothed sensitivity × uncertainty,
:class:`~.adalora_schedule.Importance`) — each switch on one more preallocated triplet, as long as
its cost (``in + out + 1`` parameters) fits in what is left of the budget and the module has a free
slot. A new triplet's ``λ`` is set to zero when it is switched on, so the model's output does not
change at that step; its ``Q`` and ``P`` keep their random initialisation, so ``λ`` gets a gradient
from the next step on. Ranks never shrink.

Paper: Zhang et al., IncreLoRA, https://arxiv.org/abs/2308.12043
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.errors import BudgetError
from ..core.host import get_module
from .adalora_schedule import GradTap, Importance, orthogonality_penalty, svd_deltas
from .increlora import GatedSVDDelta, IncreLoRA, triplet_cost


class IncreLoRASchedule:
    """Trainer callback growing IncreLoRA delta ``name`` (see the module doc). ``history`` records
    ``(step, live parameters, {path: new rank})`` at every growth."""

    def __init__(self, name: str = "default", total_step: int | None = None) -> None:
        self.name, self._total = name, total_step
        self.history: list[tuple[int, int, dict[str, int]]] = []
        self.tap = GradTap()

    def on_train_start(self, model: nn.Module) -> None:
        found = svd_deltas(model, self.name, GatedSVDDelta)
        self.deltas: dict[str, GatedSVDDelta] = found  # type: ignore[assignment]
        spec = next(iter(self.deltas.values())).spec
        if not isinstance(spec, IncreLoRA):
            raise BudgetError(f"delta {self.name!r} is a {type(spec).__name__}, not IncreLoRA")
        self.spec: IncreLoRA = spec
        self.total = self._total or spec.total_step
        self.costs = {p: triplet_cost(get_module(model, p)) for p in self.deltas}
        self.budget = spec.budget_for(self.costs)
        if self.used() > self.budget:
            raise BudgetError(
                f"IncreLoRA's live parameters ({self.used():,}) already exceed its budget "
                f"({self.budget:,})"
            )
        self.importance = Importance(spec.beta1, spec.beta2)
        self.tap.close()
        self.tap.attach([p for d in self.deltas.values() for p in (d.lora_A, d.lora_E, d.lora_B)])

    def used(self) -> int:
        """Live parameters (what the budget counts)."""
        return sum(d.rank * self.costs[p] for p, d in self.deltas.items())

    def ranks(self) -> dict[str, int]:
        return {p: d.rank for p, d in self.deltas.items()}

    def penalty(self, model: nn.Module, batch: Any, outputs: torch.Tensor) -> torch.Tensor | None:
        if self.spec.orth_reg_weight == 0:
            return None
        return self.spec.orth_reg_weight * orthogonality_penalty(self.deltas, live_only=True)

    def on_step_end(self, model: nn.Module, step: int) -> None:
        s = self.spec
        growing = step > s.tinit and (self.total is None or step <= self.total - s.tfinal)
        if not growing:
            return
        for path, d in self.deltas.items():
            for suffix in ("lora_A", "lora_E", "lora_B"):
                p = getattr(d, suffix)
                self.importance.update(f"{path}.{suffix}", p.detach(), self.tap.get(p))
        if (step - s.tinit) % s.delta_t == 0:
            self.grow(step)

    @torch.no_grad()
    def grow(self, step: int) -> dict[str, int]:
        """Switch on one triplet in each of the ``grow_per_step`` most important modules that can
        take it."""
        left = self.budget - self.used()
        scores = {}
        for p, d in self.deltas.items():
            live = d.rank_mask
            scores[p] = float(self.importance.triplets(p, d)[live].mean()) if live.any() else 0.0
        grown: dict[str, int] = {}
        for p in sorted(scores, key=lambda q: (-scores[q], q)):
            if len(grown) == self.spec.grow_per_step:
                break
            d = self.deltas[p]
            free = (~d.rank_mask).nonzero().flatten()
            if free.numel() == 0 or self.costs[p] > left:
                continue
            slot = int(free[0])
            d.lora_E[slot] = 0.0  # zero contribution at the switch: the output does not jump
            d.rank_mask[slot] = True
            left -= self.costs[p]
            grown[p] = d.rank
        if grown:
            self.history.append((step, self.used(), grown))
        return grown

    def on_train_end(self, model: nn.Module) -> None:
        self.tap.close()
