"""The one delta contract every method implements.

A :class:`Delta` lives inside a :class:`~deltatune.core.host.DeltaHost` and turns the host's output
``h = base(x)`` into ``h'``: parallel deltas return ``h + s·f(x)``, sequential ones ``h + s·f(h)``,
multiplicative ones ``h ⊙ v``. Foldable deltas also express themselves as a weight change
(:meth:`delta_weight`), the single source for merging, task vectors, compression and peft
conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch
from torch import nn

from .errors import StateError

if TYPE_CHECKING:  # pragma: no cover
    from .host import DeltaHost
    from .spec import DeltaSpec


@dataclass(frozen=True)
class Factor:
    """One low-rank term of a weight change: ``scale · B @ A`` with ``A`` (r, in) and ``B`` (out,
    r), transposed when the base stores its weight as (in, out) (GPT-2 Conv1D, Embedding)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0
    transposed: bool = False


class Delta(nn.Module):
    """Base class of per-host deltas.

    Subclasses set ``foldable`` and implement :meth:`forward`; foldable ones implement
    :meth:`delta_weight` and, when the change depends on the current base weights (DoRA, OFT,
    (IA)³), override :meth:`merge_into` / :meth:`unmerge_from` with an exact inverse.
    """

    foldable: ClassVar[bool] = False

    def __init__(self, spec: "DeltaSpec") -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: "DeltaHost") -> torch.Tensor:
        raise NotImplementedError

    def release(self, host: "DeltaHost") -> None:
        """Called when the delta is removed from ``host``: undo any change made to the base
        module."""

    def after_load(self, host: "DeltaHost") -> None:
        """Called after saved tensors were loaded into this delta (re-derive anything computed)."""

    # -- weight view --------------------------------------------------------------------------
    def delta_weight(self, host: "DeltaHost") -> dict[str, torch.Tensor]:
        """Change of the host's parameters, ``{"weight": ΔW, "bias": Δb}``, in the base's own
        layout."""
        raise StateError(
            f"{type(self).__name__} ({self.spec.method}) cannot be written as a weight change; "
            "keep it unmerged (it is applied in the forward pass)"
        )

    @torch.no_grad()
    def merge_into(self, host: "DeltaHost") -> None:
        for pname, change in self.delta_weight(host).items():
            param = host.base_param(pname)
            param.add_(change.to(param.dtype))

    @torch.no_grad()
    def unmerge_from(self, host: "DeltaHost") -> None:
        for pname, change in self.delta_weight(host).items():
            param = host.base_param(pname)
            param.sub_(change.to(param.dtype))

    def factors(self, host: "DeltaHost") -> list[Factor] | None:
        """The weight change as a sum of low-rank terms, when it is exactly one (plain LoRA);
        ``None`` otherwise. Algebra keeps such changes factored (exact sums by concatenation, SVD
        re-factoring) instead of forming the dense ``out × in`` matrix."""
        return None

    def budget_parameters(self) -> int:
        """Parameters this delta counts against a budget: its trainable ones (SVD-form deltas count
        the triplets they keep at the end of their schedule)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- per-sample routing -------------------------------------------------------------------
    @classmethod
    def routed_forward(
        cls,
        deltas: Sequence["Delta"],
        index: torch.Tensor,
        x: torch.Tensor,
        h: torch.Tensor,
        host: "DeltaHost",
    ) -> torch.Tensor:
        """Apply ``deltas[index[i]]`` to sample ``i`` (``-1``: none), batch dimension first.

        The default groups samples by delta (a loop over the adapters in the batch, never over
        samples); methods with a batched form (LoRA) override it with one gathered computation.
        """
        out = h
        for j, delta in enumerate(deltas):
            rows = (index == j).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            part = delta(x.index_select(0, rows), h.index_select(0, rows), host)
            out = out.index_copy(0, rows, part)
        return out
