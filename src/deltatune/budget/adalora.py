"""After an AdaLoRA/IncreLoRA run: the final ranks, an :class:`Allocation`, a plain LoRA.

The schedules themselves live with their methods (:mod:`deltatune.methods.adalora_schedule`,
:mod:`deltatune.methods.increlora_schedule`) and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..methods.adalora_schedule import (
    AdaLoRASchedule,
    GradTap,
    Importance,
    orthogonality_penalty,
    svd_deltas,
)
from .sensitivity import Allocation, BudgetError, Row

__all__ = ["AdaLoRASchedule", "GradTap", "Importance", "allocation_of", "enforce_ranks",
           "final_ranks", "orthogonality_penalty", "svd_deltas", "to_lora"]


def final_ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Live rank of every module of AdaLoRA/IncreLoRA delta ``name``."""
    return {p: d.rank for p, d in svd_deltas(model, name).items()}


@torch.no_grad()
def enforce_ranks(model: nn.Module, name: str = "default") -> int:
    """Zero the λ of every triplet outside ``rank_mask``; returns how many were live outside it.

    AdaLoRA's forward uses λ as it is (pruning zeroes it in place), so tensors from before the
    final allocation (a state saved elsewhere, or restored by a trainer that does not ask the
    schedule) hold pruned triplets live: more than ``target_r × modules`` while ``rank_mask``
    still shows the budget. deltatune's trainer never restores such a state as the best
    (:meth:`AdaLoRASchedule.keeps_best`), so after ``fit`` this finds nothing; it is the check
    (0 expected) and the repair for tensors from anywhere else."""
    revived = 0
    for d in svd_deltas(model, name).values():
        if getattr(d, "gated", False):  # IncreLoRA: the forward already multiplies by the mask
            continue
        off = ~d.rank_mask
        revived += int((d.lora_E[off] != 0).any(dim=1).sum()) if off.any() else 0
        d.lora_E.masked_fill_(off.unsqueeze(1), 0.0)
    return revived


def allocation_of(
    model: nn.Module,
    name: str = "default",
    scores: Mapping[str, torch.Tensor] | None = None,
    budget: int | None = None,
) -> Allocation:
    """An :class:`Allocation` (one row per module, LoRA ranks) from a trained AdaLoRA/IncreLoRA
    delta: printable with ``lines()`` and re-attachable as a plain LoRA with ``attach()``."""
    deltas = svd_deltas(model, name)
    kept = {
        p: float(scores[p][d.rank_mask].sum()) if scores and p in scores else float(d.rank)
        for p, d in deltas.items()
    }
    total = sum(kept.values()) or 1.0
    rows = []
    for p, d in deltas.items():
        shape = (d.lora_B.shape[0], d.lora_A.shape[1])
        rows.append(Row(p, shape, kept[p] / total, d.rank * sum(shape), rank=d.rank))
    return Allocation(budget if budget is not None else sum(r.params for r in rows), rows)


@torch.no_grad()
def to_lora(model: nn.Module, name: str = "default", lora_name: str | None = None) -> str:
    """Attach a plain LoRA ``lora_name`` (per-module ranks) equal to AdaLoRA/IncreLoRA delta
    ``name``.

    The live triplets become ``A = diag(λ)·Q``, ``B = s·P`` with scaling 1
    (``alpha_pattern = rank``); modules left with rank 0 get no LoRA. Trainable module copies (a new
    head) are copied too. The result saves in deltatune's or peft's LoRA layout; detach ``name`` to
    keep only the LoRA."""
    from ..core.model import attach, get_spec, set_active
    from ..io.adapter import parts_of
    from ..methods.lora import LoRA

    deltas = svd_deltas(model, name)
    ranks = {p: d.rank for p, d in deltas.items() if d.rank > 0}
    if not ranks:
        raise BudgetError(f"every module of {name!r} has rank 0; there is no LoRA to export")
    lora_name = lora_name or f"{name}-lora"
    spec = get_spec(model, name)
    top = max(ranks.values())
    attach(
        model,
        LoRA(
            r=top,
            alpha=float(top),
            targets=tuple(ranks),
            rank_pattern=ranks,
            alpha_pattern={p: float(r) for p, r in ranks.items()},
            trainable_modules=spec.trainable_modules,
        ),
        lora_name,
        activate=False,
    )
    new, new_copies = parts_of(model, lora_name)
    for p in ranks:
        d, keep = deltas[p], deltas[p].rank_mask
        new[p].lora_A.copy_((d.lora_A * d.values())[keep])
        new[p].lora_B.copy_(d.lora_B[:, keep] * d.scaling)
    _, old_copies = parts_of(model, name)
    for p, module in new_copies.items():
        module.load_state_dict(old_copies[p].state_dict())
    set_active(model, [lora_name])
    return lora_name
