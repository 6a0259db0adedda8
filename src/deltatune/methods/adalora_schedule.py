"""AdaLoRA's budget schedule as a trainer callback; it lives with its method (adalora.py).

:class:`AdaLoRASchedule` does what peft's ``update_and_allocate`` does, step for step (the test
compares the two numerically): after each optimizer step it updates every AdaLoRA parameter's
importance ``I = |θ·∇θ|``, smoothed ``Ī ← β₁Ī + (1−β₁)I`` and its uncertainty
``Ū ← β₂Ū + (1−β₂)|I − Ī|``; a triplet's score is ``s(λ_i) + mean s(Q_i·) + mean s(P_·i)`` with
``s = Ī·Ū``. The total rank budget follows a cubic schedule from ``init_r × modules`` (until step
``tinit``) down to ``target_r × modules`` (at step ``total_step − tfinal``); every ``delta_t`` steps
the lowest-scoring triplets beyond the budget get ``λ_i = 0``. After ``total_step − tfinal`` the
last pattern is frozen, and only evaluations from then on may be the best state a trainer
restores (``keeps_best``; ``TrainConfig.keep_best``). Its ``penalty`` is the orthogonality
regulariser ``‖QQᵀ − I‖_F`` / ``‖PᵀP − I‖_F`` averaged over the matrices (peft's form).

Paper: Zhang et al., AdaLoRA, https://arxiv.org/abs/2303.10512

The schedule is a plain object with the trainer's hook names (``on_train_start``, ``penalty``,
``on_step_end``, ``on_train_end``; see :mod:`deltatune.train.callbacks`): the trainer looks hooks up
by name, so the method layer needs nothing from ``train``. What to do with the result (a LoRA
export, an :class:`~deltatune.budget.Allocation`) is in :mod:`deltatune.budget.adalora`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..core.errors import BudgetError
from ..core.host import iter_hosts
from .adalora import AdaLoRA, SVDDelta


class Importance:
    """Smoothed sensitivity and uncertainty per tensor (AdaLoRA eqs. 8-10); ``score = Ī·Ū``."""

    def __init__(self, beta1: float, beta2: float) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.reset()

    def reset(self) -> None:
        self.avg: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, key: str, param: torch.Tensor, grad: torch.Tensor | None) -> None:
        ipt = (param * grad).abs() if grad is not None else torch.zeros_like(param)
        avg = self.avg.get(key, torch.zeros_like(param))
        unc = self.unc.get(key, torch.zeros_like(param))
        avg = self.beta1 * avg + (1 - self.beta1) * ipt
        self.avg[key] = avg
        self.unc[key] = self.beta2 * unc + (1 - self.beta2) * (ipt - avg).abs()

    def score(self, key: str, like: torch.Tensor) -> torch.Tensor:
        if key not in self.avg:
            return torch.zeros_like(like)
        return self.avg[key] * self.unc[key]

    def triplets(self, path: str, delta: SVDDelta) -> torch.Tensor:
        """Score of each triplet of ``delta``, shape (r,)."""
        s_a = self.score(f"{path}.lora_A", delta.lora_A).mean(dim=1)
        s_b = self.score(f"{path}.lora_B", delta.lora_B).mean(dim=0)
        s_e = self.score(f"{path}.lora_E", delta.lora_E).view(-1)
        return s_e + (s_a + s_b)


class GradTap:
    """Keeps each parameter's latest accumulated gradient: the trainer zeroes ``.grad`` right after
    the optimizer step, before ``on_step_end``, so the schedule reads the gradient it saw here."""

    def __init__(self) -> None:
        self.grads: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def attach(self, params: list[nn.Parameter]) -> None:
        for p in params:
            # the same tensor is later clipped in place, so the clipped gradient is what is read
            self._handles.append(
                p.register_post_accumulate_grad_hook(
                    lambda q: self.grads.__setitem__(id(q), q.grad)
                )
            )

    def get(self, p: torch.Tensor) -> torch.Tensor | None:
        return p.grad if p.grad is not None else self.grads.get(id(p))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.grads = [], {}


def svd_deltas(model: nn.Module, name: str, kind: type = SVDDelta) -> dict[str, SVDDelta]:
    """The SVD-form deltas (AdaLoRA / IncreLoRA) of delta ``name``, by host path."""
    found = {
        p: h.part(name)
        for p, h in iter_hosts(model)
        if name in h.delta_names() and isinstance(h.part(name), kind)
    }
    if not found:
        raise BudgetError(
            f"the model has no {kind.__name__} delta named {name!r}; attach an AdaLoRA/IncreLoRA "
            "spec first"
        )
    return found


def orthogonality_penalty(deltas: Mapping[str, SVDDelta], live_only: bool = False) -> torch.Tensor:
    """Mean over the Q and P matrices of ``‖QQᵀ − I‖_F`` and ``‖PᵀP − I‖_F`` (peft's
    regulariser)."""
    terms = []
    for d in deltas.values():
        a, b = d.lora_A, d.lora_B
        if live_only:
            a, b = a[d.rank_mask], b[:, d.rank_mask]
        for cov in (a @ a.T, b.T @ b):
            terms.append(
                torch.linalg.matrix_norm(
                    cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                )
            )
    return torch.stack(terms).mean()


class AdaLoRASchedule:
    """Trainer callback: importance scores, cubic budget, masking, orthogonality penalty (see module
    doc).

    ``total_step`` overrides the spec's (one of them must be given: the schedule needs the run's
    length). If training stops before the final allocation, ``on_train_end`` applies it (with a
    warning), so the result always holds ``target_r × modules`` triplets. ``history`` records
    ``(step, budget, live rank)`` at each allocation."""

    def __init__(self, name: str = "default", total_step: int | None = None) -> None:
        self.name, self._total = name, total_step
        self.history: list[tuple[int, int, int]] = []
        self.scores: dict[str, torch.Tensor] = {}
        self.finalised = False
        self.tap = GradTap()

    # -- set up ------------------------------------------------------------------------------------
    def on_train_start(self, model: nn.Module) -> None:
        self.deltas = svd_deltas(model, self.name)
        spec = next(iter(self.deltas.values())).spec
        if not isinstance(spec, AdaLoRA):
            raise BudgetError(
                f"delta {self.name!r} is a {type(spec).__name__}, not AdaLoRA; use its own schedule"
            )
        self.spec: AdaLoRA = spec
        self.total = self._total or spec.total_step
        if self.total is None:
            raise BudgetError(
                "AdaLoRA needs the run's length: set AdaLoRA(total_step=...) or "
                "AdaLoRASchedule(total_step=...)"
            )
        if spec.tinit >= self.total - spec.tfinal:
            raise BudgetError(
                f"AdaLoRA tinit={spec.tinit} and tfinal={spec.tfinal} leave no budgeting phase in "
                f"{self.total} steps; lower them or train longer"
            )
        self.init_budget = sum(d.lora_A.shape[0] for d in self.deltas.values())
        self.target_budget = spec.target_r * len(self.deltas)
        self.importance = Importance(spec.beta1, spec.beta2)
        self.tap.close()
        self.tap.attach([p for d in self.deltas.values() for p in (d.lora_A, d.lora_E, d.lora_B)])
        self.finalised = False

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank budget, whether to mask now) at ``step`` (peft's cubic schedule)."""
        s = self.spec
        if step <= s.tinit:
            return self.init_budget, False
        if step > self.total - s.tfinal:
            return self.target_budget, True
        left = 1 - (step - s.tinit) / (self.total - s.tfinal - s.tinit)
        return int(
            (self.init_budget - self.target_budget) * left**3 + self.target_budget
        ), step % s.delta_t == 0

    # -- hooks -------------------------------------------------------------------------------------
    def penalty(self, model: nn.Module, batch: Any, outputs: torch.Tensor) -> torch.Tensor | None:
        if self.spec.orth_reg_weight == 0:
            return None
        return self.spec.orth_reg_weight * orthogonality_penalty(self.deltas)

    def on_step_end(self, model: nn.Module, step: int) -> None:
        end = self.total - self.spec.tfinal
        if step < end:
            self._update_importance()
            budget, now = self.budget_schedule(step)
            if now:
                self._mask_to_budget(step, budget)
        elif step == end:
            self._mask_to_budget(step, self.budget_schedule(step)[0])
            self.importance.reset()
            self.finalised = True
        else:
            self._apply_masks()

    def keeps_best(self, model: nn.Module, step: int) -> bool:
        """Only states from the final allocation on (step ``total_step − tfinal``) may be restored
        as the best: one saved before it holds λ of triplets pruned since, and restoring it would
        bring them back beyond the rank budget while ``rank_mask`` still shows the budget."""
        return step >= self.total - self.spec.tfinal

    def on_train_end(self, model: nn.Module) -> None:
        self.tap.close()
        if not self.finalised and hasattr(self, "deltas"):
            warnings.warn(
                "training stopped before AdaLoRA's final allocation (step "
                f"{self.total - self.spec.tfinal}); pruning to the target of {self.target_budget} "
                "triplets now",
                stacklevel=2,
            )
            self._mask_to_budget(self.history[-1][0] + 1 if self.history else 0, self.target_budget)
            self.finalised = True

    # -- allocation --------------------------------------------------------------------------------
    def _update_importance(self) -> None:
        for path, d in self.deltas.items():
            for suffix in ("lora_A", "lora_E", "lora_B"):
                p = getattr(d, suffix)
                self.importance.update(f"{path}.{suffix}", p.detach(), self.tap.get(p))

    @torch.no_grad()
    def _mask_to_budget(self, step: int, budget: int) -> None:
        scores = {p: self.importance.triplets(p, d) for p, d in self.deltas.items()}
        flat = torch.cat(list(scores.values()))
        k = self.init_budget - budget
        # peft's rule: the k-th smallest score is the threshold, every triplet at or below it is
        # pruned
        threshold = float(torch.kthvalue(flat.cpu(), k).values) if k > 0 else None
        for path, d in self.deltas.items():
            d.rank_mask.copy_(
                scores[path] > threshold if threshold is not None else torch.ones_like(d.rank_mask)
            )
        self.scores = scores
        self._apply_masks()
        self.history.append((step, budget, self.live_rank()))

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for d in self.deltas.values():
            d.lora_E.masked_fill_(~d.rank_mask.unsqueeze(1), 0.0)

    # -- results -----------------------------------------------------------------------------------
    def live_rank(self) -> int:
        return sum(d.rank for d in self.deltas.values())

    def ranks(self) -> dict[str, int]:
        """Live triplets per module (the final per-layer ranks once training is done)."""
        return {p: d.rank for p, d in self.deltas.items()}
