"""Parameter budgets: where deltas go and how big (see docs/budgets.md).

Built so far: SPT-style sensitivity allocation (:func:`allocate_sensitivity`, `deltatune allocate`).
"""

from .sensitivity import Allocation, BudgetError, Row, allocate_sensitivity, candidate_paths, parse_budget

__all__ = ["Allocation", "BudgetError", "Row", "allocate_sensitivity", "candidate_paths", "parse_budget"]
