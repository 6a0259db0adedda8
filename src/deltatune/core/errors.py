"""User-facing errors. Each message is one line that names the problem and the fix."""

from __future__ import annotations


class DeltaError(ValueError):
    """Base class of every deltatune error caused by bad input or a wrong call order."""


class SpecError(DeltaError):
    """A method spec has a bad field value."""


class TargetError(DeltaError):
    """Target selection matched nothing, or matched a module type the method cannot host."""


class StateError(DeltaError):
    """An operation does not fit the current state (e.g. routing while merged, a name attached
    twice)."""


class DeltaFileError(DeltaError):
    """A delta file or directory is missing, corrupt, from a newer format, or for another base
    model."""


class BudgetError(DeltaError):
    """A budget that cannot be spent (too small, malformed) or targets that do not exist.

    Defined here, not in ``budget``, because the methods whose training schedules spend a budget
    (AdaLoRA, IncreLoRA) raise it too and may import nothing but ``core``."""
