"""Weight averaging of fine-tuned models: uniform and greedy soups, WiSE-FT interpolation.

- Model soups — Wortsman et al., https://arxiv.org/abs/2203.05482 (uniform soup; greedy soup adds
  ingredients in order of held-out score, keeping each only if the soup's score does not drop)
- WiSE-FT — Wortsman et al., Robust fine-tuning of zero-shot models,
  https://arxiv.org/abs/2109.01903 (θ_α = (1−α)·θ_zero-shot + α·θ_fine-tuned; sweep α, plot
  in-distribution vs shifted accuracy)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .errors import MergeError
from .registry import get_method

State = Mapping[str, torch.Tensor]


def merge_state_dicts(
    method: str,
    models: Sequence[State],
    base: State | None = None,
    *,
    stats: Sequence[State] | None = None,
    **params,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with a registered method, tensor by tensor.

    Per-model parameters are lists (one per model) or scalars; ``stats`` are per-model Fisher / Gram
    dicts for the methods that use them. Non-floating tensors are taken from the base (or first
    model).
    """
    spec = get_method(method)
    if not models:
        raise MergeError("no state dicts to merge")
    spec.check_inputs(len(models), base is not None)
    k = len(models)
    per_model = [{p: (params[p][i] if isinstance(params[p], (list, tuple)) else params[p])
                  for p in spec.model_params if p in params} for i in range(k)]
    kwargs = spec.resolve(
        per_model, {p: v for p, v in params.items() if p not in spec.model_params}
    )
    ref = base if base is not None else models[0]
    out = {}
    for name, t in ref.items():
        missing = [i for i, m in enumerate(models) if name not in m]
        if missing:
            raise MergeError(
                f"model {missing[0]} has no {name!r}; merge state dicts of one architecture"
            )
        if not t.is_floating_point():
            out[name] = t.clone()
            continue
        extra = {}
        if spec.stats:
            have = [s is not None and name in s for s in (stats or [None] * k)]
            extra["stats"] = [s[name] for s in stats] if all(have) else None
        out[name] = spec(
            t if spec.needs_base else None, [m[name] for m in models], **kwargs, **extra
        )
    return out


def uniform_soup(
    models: Sequence[State], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """The (weighted) average of the models' weights."""
    return merge_state_dicts("linear", models, weight=list(weights) if weights is not None else 1.0)


@contextlib.contextmanager
def loaded(model: nn.Module, state: State) -> Iterator[nn.Module]:
    """Temporarily copy ``state`` into ``model``'s matching parameters/buffers; restored on exit."""
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise MergeError(
            f"the model has no {unknown[0]!r}; load states saved from this architecture"
        )
    saved = {k: own[k].detach().clone() for k in state}
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                own[k].copy_(v)


@dataclass
class SoupResult:
    state: dict[str, torch.Tensor]
    ingredients: list[int]
    score: float
    individual: list[float]
    history: list[tuple[int, float, bool]] = field(
        default_factory=list
    )  # (candidate, soup score, kept)


def greedy_soup(models: Sequence[State], score: Callable[[State], float]) -> SoupResult:
    """Greedy soup: rank ingredients by their own held-out ``score`` (higher is better), start from
    the best, add each next one if the averaged soup scores at least as well."""
    if not models:
        raise MergeError("greedy_soup needs at least one model")
    individual = [float(score(m)) for m in models]
    order = sorted(range(len(models)), key=lambda i: -individual[i])
    chosen = [order[0]]
    best, history = individual[order[0]], []
    state = dict(models[order[0]])
    for i in order[1:]:
        candidate = uniform_soup([models[j] for j in chosen + [i]])
        s = float(score(candidate))
        kept = s >= best
        history.append((i, s, kept))
        if kept:
            chosen.append(i)
            best, state = s, candidate
    return SoupResult(state, chosen, best, individual, history)


def wise_ft(zero_shot: State, fine_tuned: State, alpha: float) -> dict[str, torch.Tensor]:
    """(1−α)·θ_zero-shot + α·θ_fine-tuned (floating tensors; others from the zero-shot model)."""
    if not 0.0 <= alpha <= 1.0:
        raise MergeError(f"WiSE-FT alpha must be in [0, 1], got {alpha}")
    return merge_state_dicts(
        "linear", [zero_shot, fine_tuned], weight=[1.0 - alpha, alpha], normalize=False
    )


def wise_ft_sweep(
    zero_shot: State,
    fine_tuned: State,
    evaluate: Callable[[State], Mapping[str, float]],
    alphas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
) -> list[dict[str, float]]:
    """Evaluate the interpolations; ``evaluate(state)`` returns e.g. ``{"id": acc, "shift": acc}``.
    Returns one row per α: ``{"alpha": α, **scores}``."""
    return [
        {
            "alpha": float(a),
            **{k: float(v) for k, v in evaluate(wise_ft(zero_shot, fine_tuned, a)).items()},
        }
        for a in alphas
    ]


def plot_wise_ft(
    rows: Sequence[Mapping[str, float]],
    path: str | os.PathLike,
    *,
    x: str = "id",
    y: str = "shift",
    title: str = "WiSE-FT: weight-space interpolation",
) -> Path:
    """Accuracy on shifted data against in-distribution accuracy, one point per α (written
    atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.files import save_figure

    if not rows or any(x not in r or y not in r for r in rows):
        raise MergeError(
            f"every row needs {x!r} and {y!r} scores to plot; got "
            f"{list(rows[0]) if rows else 'no rows'}"
        )
    fig, ax = plt.subplots(figsize=(5, 4))
    xs, ys = [r[x] for r in rows], [r[y] for r in rows]
    ax.plot(xs, ys, "-o", color="tab:blue", label="WiSE-FT (α from 0 to 1)")
    for r in rows:
        ax.annotate(
            f"{r['alpha']:.1f}", (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=7
        )
    ends = [rows[0], rows[-1]]
    ax.scatter(
        [r[x] for r in ends],
        [r[y] for r in ends],
        color="tab:red",
        zorder=3,
        label="zero-shot / fine-tuned",
    )
    ax.set_xlabel(f"{x} accuracy")
    ax.set_ylabel(f"{y} accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
