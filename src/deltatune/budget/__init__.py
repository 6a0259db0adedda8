"""Parameter budgets: where deltas go and how big (see docs/budgets.md).

- SPT-style sensitivity allocation without training (:func:`allocate_sensitivity`,
  `deltatune allocate`);
- AdaLoRA's pruning schedule (:class:`AdaLoRASchedule`) and IncreLoRA's growth
  (:class:`IncreLoRASchedule`), trainer callbacks for the ``AdaLoRA`` / ``IncreLoRA`` specs (defined
  with their methods in ``deltatune.methods``, re-exported here); :func:`to_lora` exports the
  result;
- multi-objective config search (:mod:`deltatune.budget.search`, `deltatune search`; needs optuna).
"""

from ..methods.increlora_schedule import IncreLoRASchedule
from .adalora import (
    AdaLoRASchedule,
    allocation_of,
    enforce_ranks,
    final_ranks,
    orthogonality_penalty,
    to_lora,
)
from .sensitivity import (
           Allocation,
           BudgetError,
           Row,
           allocate_sensitivity,
           candidate_paths,
           parse_budget,
)

__all__ = [
    "AdaLoRASchedule",
    "Allocation",
    "BudgetError",
    "IncreLoRASchedule",
    "Row",
    "allocate_sensitivity",
    "allocation_of",
    "candidate_paths",
    "enforce_ranks",
    "final_ranks",
    "orthogonality_penalty",
    "parse_budget",
    "to_lora",
]
