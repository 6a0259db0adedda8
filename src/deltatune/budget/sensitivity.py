"""Sensitivity-aware allocation of a parameter budget (SPT-style), without training.

One gradient pass on a few batches scores every weight entry of the candidate matrices by its
empirical Fisher (squared gradient). The budget's worth of most sensitive entries is chosen
globally; a matrix holding at least one rank-1 LoRA's worth of them (``out + in``) gets a LoRA whose
rank spends that share, the others get sparse tuning of exactly those entries.
SPT: He et al., "Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning",
https://arxiv.org/abs/2303.08566
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..core.errors import BudgetError
from ..core.host import get_module


def parse_budget(budget: str | int | float, model: nn.Module) -> int:
    """``"0.5%"`` of the model's parameters, or an absolute count (``20000``, ``"20k"``)."""
    total = sum(p.numel() for p in model.parameters())
    text = str(budget).strip().lower()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%|k|m)?", text)
    if not m:
        raise BudgetError(
            f"budget {budget!r} is not a number of parameters or a percentage; use e.g. 0.5% or "
            "20000"
        )
    value, unit = float(m.group(1)), m.group(2)
    count = value / 100 * total if unit == "%" else value * {"k": 1e3, "m": 1e6}.get(unit or "", 1)
    if count < 1:
        raise BudgetError(
            f"budget {budget!r} is less than one parameter of this {total:,}-parameter model"
        )
    return int(count)


@dataclass
class Row:
    path: str
    shape: tuple[int, int]
    score_share: float  # this matrix's share of the chosen entries' total sensitivity
    chosen: int  # budget entries that fell in this matrix
    rank: int = 0  # LoRA rank (0: none)
    sparse: int = 0  # entries tuned sparsely

    @property
    def params(self) -> int:
        return self.rank * (self.shape[0] + self.shape[1]) + self.sparse


@dataclass
class Allocation:
    budget: int
    rows: list[Row]
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def used(self) -> int:
        return sum(r.params for r in self.rows)

    def lines(self) -> list[str]:
        width = max(len(r.path) for r in self.rows)
        out = []
        for r in self.rows:
            what = (f"LoRA r={r.rank:<3d}" if r.rank else "          ") + (
                f"  sparse {r.sparse:>7,d}" if r.sparse else ""
            )
            out.append(
                f"{r.path:<{width}}  {r.shape[0]:>5d}x{r.shape[1]:<5d} sensitivity "
                f"{100 * r.score_share:5.1f}%  {what.rstrip() or '-'}  ({r.params:,} params)"
            )
        return out

    def attach(self, model: nn.Module, name: str = "budget", **lora_options: Any) -> list[str]:
        """Attach the allocation: a LoRA ``<name>-lora`` (per-module ranks) and a SparseFT
        ``<name>-sparse`` with the chosen entries; both train and are active together. Returns the
        delta names."""
        from ..core.model import attach
        from ..methods.lora import LoRA
        from ..methods.sparse import SparseFT, attach_masked

        names = []
        lora = {r.path: r.rank for r in self.rows if r.rank}
        if lora:
            top = max(lora.values())
            attach(
                model,
                LoRA(
                    r=top,
                    alpha=lora_options.pop("alpha", 2 * top),
                    targets=tuple(lora),
                    rank_pattern=lora,
                    **lora_options,
                ),
                f"{name}-lora",
            )
            names.append(f"{name}-lora")
        sparse = {r.path: self.masks[r.path] for r in self.rows if r.sparse}
        if sparse:
            attach_masked(model, SparseFT(selection="given"), sparse, name=f"{name}-sparse")
            names.append(f"{name}-sparse")
        return names


def candidate_paths(model: nn.Module, targets: Iterable[str] | None = None) -> list[str]:
    """Linear layers (all, or those whose name ends with one of ``targets``), heads excluded by the
    caller."""
    paths = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if targets:
        targets = list(targets)
        chosen = [p for p in paths if any(p == t or p.endswith("." + t) for t in targets)]
        if not chosen:
            import difflib

            close = difflib.get_close_matches(
                targets[0], [p.rpartition(".")[2] for p in paths], n=3
            )
            raise BudgetError(
                f"no Linear layer matches {targets}; closest names: "
                f"{', '.join(dict.fromkeys(close)) or 'none'}"
            )
        return chosen
    return paths


def allocate_sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    budget: int,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    paths: list[str],
) -> Allocation:
    """Score, choose the ``budget`` most sensitive entries, and split them into LoRA ranks and
    sparse entries."""
    from ..methods.sparse import fisher_scores

    if not paths:
        raise BudgetError("no candidate matrices to allocate over")
    smallest = min(sum(get_module(model, p).weight.shape) for p in paths)
    if budget < smallest:
        raise BudgetError(
            f"budget of {budget:,} parameters is smaller than one rank-1 LoRA here ({smallest:,}); "
            "give a larger budget"
        )
    scores = fisher_scores(model, batches, loss_fn, paths)
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = min(budget, flat.numel())
    threshold = flat.topk(k).values.min()
    total_score = float(flat.topk(k).values.sum().clamp(min=1e-30))
    rows, masks = [], {}
    for path, s in scores.items():
        mask = s >= threshold
        chosen = int(mask.sum())
        shape = tuple(s.shape)
        row = Row(path, shape, float(s[mask].sum()) / total_score, chosen)
        per_rank = shape[0] + shape[1]
        if chosen >= per_rank:
            row.rank = chosen // per_rank
        elif chosen:
            row.sparse = chosen
            masks[path] = mask
        rows.append(row)
    return Allocation(budget, rows, masks)
