"""A method's own test example: what the shared contract tests build, and how exact it must be.

Every registered spec declares one as a class attribute, next to its options::

    example = Example(dict(r=2, targets=("fc1", "fc2")), bad=(({"r": 0}, "r"),))

and tests/test_contract.py runs the same checks on every registered method from it (equal to the
base at init, merged equals unmerged, unmerge restores, save/load round-trips, only delta parameters
get gradients, per-sample routing, no NaNs). A method is tested by registering it; one without an
example fails that test with the line to add.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

#: the tiny models of the contract tests: ``"mlp"`` is Linear layers with a LayerNorm between them
#: (for methods on whole layers); ``"transformer"`` is a 2-layer BERT and a 2-layer Llama (for
#: methods at attention, FFN, embedding or whole-stack positions)
ExampleModel = Literal["mlp", "transformer"]


@dataclass(frozen=True)
class Example:
    """A spec built from ``options`` on the tiny ``model``.

    ``tolerance`` is the absolute tolerance of merged vs unmerged outputs, of unmerge restoring the
    weights and of a disabled delta equalling the base; ``bad`` lists ``(options, field)`` pairs
    whose :class:`SpecError` must name ``field``; ``identity_at_init`` says a fresh delta leaves the
    outputs unchanged (not so for virtual tokens); ``merges`` says ``merge`` folds the delta
    (otherwise it must refuse with "cannot be merged")."""

    options: Mapping[str, Any] = field(default_factory=dict)
    model: ExampleModel = "mlp"
    tolerance: float = 1e-5
    bad: tuple[tuple[Mapping[str, Any], str], ...] = ()
    identity_at_init: bool = True
    merges: bool = True
