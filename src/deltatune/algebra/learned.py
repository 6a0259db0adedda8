"""Learned merging: merge coefficients fitted on unlabeled target data by entropy minimisation.

θ(λ) = θ_base + Σ_k λ_{k,g} · τ_k, with one coefficient per task and per group g (the whole model,
a block such as a transformer layer, or each tensor), trained so the merged model's predictions on
unlabeled target inputs are confident (low entropy). The model runs through
``torch.func.functional_call`` on θ(λ), so its own weights are never modified.

- AdaMerging — Yang et al., https://arxiv.org/abs/2310.02575 (task-wise / layer-wise coefficients)
- aTLAS — Zhang et al., Knowledge Composition using Task Vectors with Learned Anisotropic Scaling,
  https://arxiv.org/abs/2407.16522 (finer, per-block scaling)
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
from torch import nn

from .errors import MergeError
from .statistical import Forward, default_forward
from .task_vector import TaskVector

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def block_of(name: str) -> str:
    """The transformer block a parameter belongs to (``layer.3``), else its top-level module
    name."""
    m = _BLOCK.search(name)
    return f"layer.{m.group(1)}" if m else name.split(".")[0]


@dataclass
class LearnedMerge:
    coefficients: torch.Tensor  # (tasks, groups)
    groups: list[str]
    state: dict[str, torch.Tensor]  # merged parameters, by name
    losses: list[float] = field(default_factory=list)


class _Functional(nn.Module):
    """Calls ``model`` with substituted parameters; lets ``forward(model, batch)`` callables run on
    θ(λ)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._model = (model,)
        self.params: dict[str, torch.Tensor] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self._model[0], self.params, args, kwargs, strict=False)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax over the last dimension."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def learn_merge_coefficients(
    model: nn.Module,
    vectors: Sequence[TaskVector | Mapping[str, torch.Tensor]],
    batches: Iterable[Any],
    *,
    base: Mapping[str, torch.Tensor] | None = None,
    granularity: Literal["global", "block", "tensor"] = "block",
    steps: int = 100,
    lr: float = 1e-3,
    init: float = 0.3,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    forward: Forward = default_forward,
    group_of: Callable[[str], str] | None = None,
) -> LearnedMerge:
    """Fit merge coefficients on unlabeled ``batches`` (cycled for ``steps`` Adam steps).

    ``base`` defaults to the model's current parameters; task vectors are keyed by parameter names.
    ``granularity``: one coefficient per task (``global``, task-wise AdaMerging), per block
    (``block``, :func:`block_of` or ``group_of``), or per tensor (``tensor``, layer-wise
    AdaMerging).
    """
    if not vectors:
        raise MergeError("learned merging needs at least one task vector")
    if steps < 1 or lr <= 0:
        raise MergeError(f"steps must be >= 1 and lr > 0 (got steps={steps}, lr={lr})")
    named = {n: p.detach() for n, p in model.named_parameters()}
    base = dict(base) if base is not None else named
    taus = [v.dense() if isinstance(v, TaskVector) else TaskVector(v) for v in vectors]
    names = list(dict.fromkeys(n for t in taus for n in t))
    unknown = [n for n in names if n not in named]
    if unknown:
        raise MergeError(
            f"task vector entry {unknown[0]!r} is not a parameter of the model; build task vectors "
            "against this model"
        )
    if granularity == "global":
        group = lambda n: "all"  # noqa: E731
    elif granularity == "block":
        group = group_of or block_of
    elif granularity == "tensor":
        group = lambda n: n  # noqa: E731
    else:
        raise MergeError(f"granularity must be 'global', 'block' or 'tensor', got {granularity!r}")
    groups = list(dict.fromkeys(group(n) for n in names))
    index = {n: groups.index(group(n)) for n in names}
    lam = torch.full((len(taus), len(groups)), float(init), requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)
    runner = _Functional(model)
    frozen = {n: base[n].detach() for n in named}
    stacked = {n: [t[n].to(frozen[n].dtype) if n in t else None for t in taus] for n in names}

    def merged(coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(frozen)
        for n in names:
            g = index[n]
            out[n] = frozen[n] + sum(
                coeffs[k, g] * tau for k, tau in enumerate(stacked[n]) if tau is not None
            )
        return out

    losses = []
    source = itertools.cycle(batches)
    with torch.enable_grad():
        for _ in range(steps):
            batch = next(source, None)
            if batch is None:
                raise MergeError(
                    "no batches to learn from; pass a non-empty iterable of unlabeled batches"
                )
            runner.params = merged(lam)
            loss = entropy(forward(runner, batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if clamp is not None:
                with torch.no_grad():
                    lam.clamp_(*clamp)
            losses.append(loss.item())
    final = lam.detach().clone()
    with torch.no_grad():
        state = {n: t.detach().clone() for n, t in merged(final).items() if n in names}
    return LearnedMerge(final, groups, state, losses)
