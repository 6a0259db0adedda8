"""Merges weighted by what the data says about each model: Fisher merging and RegMean.

Both need per-model statistics collected on each model's own data — a diagonal Fisher per parameter
(:func:`diagonal_fisher`) or the Gram matrix of each Linear layer's inputs (:func:`gram_matrices`,
forward hooks). Saved as safetensors beside a checkpoint, they also drive the streaming merger.

- Fisher merging — Matena & Raffel, https://arxiv.org/abs/2111.09832
- RegMean — Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models,
  https://arxiv.org/abs/2212.09849
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import MergeError
from .registry import UNIT, Limit, check_weight_sum, common_shape, merge_method
from .tensors import TensorLike, map_rows, read_rows, shape_of, work_dtype

Forward = Callable[[nn.Module, Any], torch.Tensor]


@merge_method(
    "fisher",
    paper="https://arxiv.org/abs/2111.09832",
    needs_base=False,
    model_params={"weight": 1.0},
    shared_params={"floor": 1e-6},
    stats="fisher",
    limits={"floor": Limit(0.0)},
    check=check_weight_sum,
)
def fisher(
    base,
    models,
    *,
    weight,
    stats: Sequence[TensorLike] | None = None,
    floor: float = 1e-6,
    out=None,
):
    """Fisher-weighted average: Σ w_k (F_k + floor) θ_k / Σ w_k (F_k + floor); a plain average
    without F."""
    shape = common_shape(None, models)
    wd = work_dtype(*(m.dtype for m in models))
    if stats is not None and any(shape_of(f) != shape for f in stats):
        raise MergeError(
            f"a Fisher tensor's shape differs from the parameter's {tuple(shape)}; compute the "
            "Fisher on the same architecture"
        )

    def block(a: int, b: int) -> torch.Tensor:
        num = den = 0
        for i, m in enumerate(models):
            f = (
                read_rows(stats[i], a, b, wd) + floor
                if stats is not None
                else torch.ones((), dtype=wd)
            )
            num = num + weight[i] * f * read_rows(m, a, b, wd)
            den = den + weight[i] * f
        return num / den

    return map_rows(shape, models[0].dtype, block, out)


@merge_method(
    "regmean",
    paper="https://arxiv.org/abs/2212.09849",
    needs_base=False,
    model_params={"weight": 1.0},
    shared_params={"alpha": 0.9},
    stats="gram",
    limits={"alpha": UNIT},
    check=check_weight_sum,
)
def regmean(
    base, models, *, weight, stats: Sequence[TensorLike] | None = None, alpha: float = 0.9, out=None
):
    """RegMean: the Linear weight minimising Σ_k ||X_k W − X_k W_k||², from each model's Gram matrix
    G_k = X_kᵀX_k (off-diagonals scaled by ``alpha``); tensors without Gram matrices are
    averaged."""
    shape = common_shape(None, models)
    wd = work_dtype(*(m.dtype for m in models))
    if stats is None or len(shape) != 2:
        from .methods import linear

        return linear(None, models, weight=weight, out=out)
    grams = []
    for i, g in enumerate(stats):
        g = read_rows(g, 0, shape_of(g)[0], torch.float64)
        if g.shape != (shape[1], shape[1]):
            raise MergeError(
                f"Gram matrix {tuple(g.shape)} does not fit a weight of shape {tuple(shape)} "
                "(needs in×in)"
            )
        diag = torch.diag_embed(g.diagonal())
        grams.append(weight[i] * (alpha * g + (1 - alpha) * diag))
    factor = _cholesky(sum(grams))

    def block(a: int, b: int) -> torch.Tensor:
        rhs = sum(
            read_rows(m, a, b, torch.float64) @ grams[i] for i, m in enumerate(models)
        )  # (rows, in)
        return torch.cholesky_solve(rhs.T, factor).T.to(wd)  # rhs · S⁻¹ (S symmetric)

    return map_rows(shape, models[0].dtype, block, out)


def _cholesky(s: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of a Gram sum, with a small ridge when it is singular (unused input
    features)."""
    ridge = 0.0
    scale = float(s.diagonal().abs().mean()) or 1.0
    for _ in range(6):
        factor, info = torch.linalg.cholesky_ex(s + ridge * torch.eye(s.shape[0], dtype=s.dtype))
        if int(info) == 0:
            return factor
        ridge = scale * (1e-8 if ridge == 0 else ridge / scale * 100)
    raise MergeError(
        "the summed Gram matrix is not positive definite even with a ridge; collect statistics on "
        "more data"
    )


# -- statistics from data --------------------------------------------------------------------------
def default_forward(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch)`` for dicts (``labels`` dropped), ``model(batch[0])`` for tuples, else
    ``model(batch)``; returns the logits (``.logits`` of a transformers output, or the first element
    of a tuple)."""
    if isinstance(batch, dict):
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    elif isinstance(batch, (tuple, list)):
        out = model(batch[0])
    else:
        out = model(batch)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, dict) else batch
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    raise MergeError(
        "cannot tell the batch size: a batch must hold at least one tensor with a batch dimension"
    )


def _sample(batch: Any, i: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[i : i + 1]
    if isinstance(batch, dict):
        return {
            k: v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
            for k, v in batch.items()
        }
    return type(batch)(
        v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for v in batch
    )


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Forward = default_forward,
    labels: Callable[[Any], torch.Tensor] | None = None,
    params: Sequence[str] | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information E[(∂ log p(y|x) / ∂θ)²] per parameter, one example at a time.

    ``y`` is sampled from the model's own prediction (the true Fisher, as in Matena & Raffel), or
    taken from ``labels(batch)`` (the empirical Fisher). ``params`` chooses parameters by name
    (default: the trainable ones, or all floating ones if none is trainable). Logits of shape
    (B, …, C) are treated as independent predictions whose log-likelihoods add up.
    """
    named = dict(model.named_parameters())
    names = list(params) if params is not None else [n for n, p in named.items() if p.requires_grad]
    names = names or [n for n, p in named.items() if p.is_floating_point()]
    unknown = [n for n in names if n not in named]
    if unknown:
        raise MergeError(
            f"model has no parameter {unknown[0]!r}; pass names from model.named_parameters()"
        )
    flags = {n: p.requires_grad for n, p in named.items()}
    for n, p in named.items():
        p.requires_grad_(n in names)
    sums = {n: torch.zeros_like(named[n], dtype=torch.float32) for n in names}
    gen = torch.Generator().manual_seed(seed)
    count = 0
    try:
        with torch.enable_grad():
            for batch in batches:
                targets = labels(batch) if labels is not None else None
                for i in range(_batch_size(batch)):
                    if max_samples is not None and count >= max_samples:
                        break
                    logp = torch.log_softmax(forward(model, _sample(batch, i)).float(), dim=-1)
                    flat = logp.reshape(-1, logp.shape[-1])
                    if targets is None:
                        y = torch.multinomial(flat.detach().exp(), 1, generator=gen).squeeze(1)
                    else:
                        y = targets[i : i + 1].reshape(-1).to(flat.device).expand(flat.shape[0])
                    loglik = flat.gather(1, y.view(-1, 1)).sum()
                    grads = torch.autograd.grad(
                        loglik, [named[n] for n in names], allow_unused=True
                    )
                    for n, g in zip(names, grads):
                        if g is not None:
                            sums[n] += g.detach().float() ** 2
                    count += 1
    finally:
        for n, p in named.items():
            p.requires_grad_(flags[n])
    if count == 0:
        raise MergeError(
            "no examples to estimate the Fisher from; pass a non-empty iterable of batches"
        )
    return {n: s / count for n, s in sums.items()}


def gram_matrices(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Forward = default_forward,
    modules: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """RegMean statistics: for every ``nn.Linear`` (or those named in ``modules``), the mean over
    input rows of xᵀx, keyed by the layer's weight name (``"<module>.weight"``). Hooks are removed
    after."""
    linears = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and (modules is None or n in modules)
    }
    if not linears:
        raise MergeError(
            "no nn.Linear layer selected: RegMean needs Linear layers (pass modules=[...] by name)"
        )
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name: str):
        def collect(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]
        return collect

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    if not sums:
        raise MergeError(
            "no batch reached the selected Linear layers; pass a non-empty iterable of batches"
        )
    return {f"{n}.weight": (sums[n] / rows[n]).float() for n in sums}
