"""Linear averaging and the generalized task-arithmetic family (task arithmetic, TIES, DARE,
breadcrumbs, DELLA): one core, ``base + λ · N(Σ_k w_k · consensus_k ⊙ sparsify_k(θ_k − base))``.

Each preset only chooses the sparsifier, whether signs are elected, and the defaults, as in
mergekit's generalized task arithmetic; its parameters keep mergekit's names (``weight``,
``density``, ``normalize``, ``rescale``, ``lambda_`` for mergekit's ``lambda``, ``int8_mask``,
``gamma``, ``epsilon``) so a mergekit YAML maps onto them one to one.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import torch

from .errors import MergeConfigError
from .registry import FINITE, FRACTION, SEED, Limit, check_weight_sum, common_shape, merge_method
from .sparsify import SparsifierName, chunk_for, fit_sparsifier
from .tensors import ChunkSink, TensorLike, map_rows, read_rows, resolve_seed, work_dtype


def generalized_task_arithmetic(
    base: TensorLike,
    models: Sequence[TensorLike],
    *,
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    sparsifier: SparsifierName | None = None,
    consensus: Literal["sum", "count"] | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    gamma: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None,
    seed: int | None = None,
    out: ChunkSink | None = None,
) -> torch.Tensor | None:
    """The shared core (mergekit's generalized task arithmetic; see the module docstring).

    Sparsify each task vector θ_k − base, weight it, optionally keep only entries agreeing with the
    elected sign (``consensus``), sum, optionally divide by the summed weights of the kept entries
    (``normalize``), scale by ``lambda_`` and add to the base.
    """
    shape = common_shape(base, models)
    k = len(models)
    wd = work_dtype(base.dtype, *(m.dtype for m in models))
    if k == 0:
        return map_rows(shape, base.dtype, lambda a, b: read_rows(base, a, b), out)
    density = list(density or [1.0] * k)
    seed_value = resolve_seed(seed) if sparsifier in ("random", "della") else 0

    # The last block of the base and of each task vector is kept: fitting a sparsifier and combining
    # read the same block one after the other (for tensors of one block, each is read only once).
    base_rows = _last_block(lambda a, b: read_rows(base, a, b, wd))
    deltas = [
        _last_block(lambda a, b, m=m: read_rows(m, a, b, wd) - base_rows(a, b)) for m in models
    ]

    def delta(i: int):
        return deltas[i]

    fitted = [
        fit_sparsifier(
            sparsifier, shape, delta(i), density[i], rescale=rescale, seed=seed_value, index=i,
            gamma=gamma[i] if gamma else 0.01, epsilon=epsilon[i] if epsilon else 0.15,
        ) if sparsifier else None
        for i in range(k)
    ]
    w = torch.tensor(list(weight), dtype=wd)

    def block(a: int, b: int) -> torch.Tensor:
        # One weighted task vector per model, then running sums: about 2K+4 blocks live, never a
        # (K, ...) stack of every intermediate.
        weighted = []
        for i in range(k):
            kept = fitted[i](deltas[i](a, b), a, b) if fitted[i] else deltas[i](a, b)
            weighted.append(kept * w[i])  # a new tensor: the cached block stays intact
        mixed = _running_sum(weighted)
        if consensus:
            if consensus == "sum":
                positive = mixed >= 0
            else:
                positive = _running_sum([t.sign() for t in weighted]) >= 0
            mixed = torch.zeros_like(mixed)
            divisor = torch.zeros_like(mixed)
            for i, t in enumerate(weighted):
                agree = torch.where(positive, t > 0, t < 0)  # zeros never agree
                mixed += t.masked_fill_(~agree, 0)
                divisor += agree * w[i]
                weighted[i] = None  # free as we go
            divisor = divisor.masked_fill_(divisor == 0, 1)
        else:
            total = float(w.sum())
            divisor = torch.tensor(total if abs(total) >= 1e-8 else 1.0, dtype=wd)
        if normalize:
            mixed = mixed / divisor
        if lambda_ != 1:
            mixed = mixed * lambda_
        return base_rows(a, b) + mixed

    return map_rows(shape, base.dtype, block, out, chunk_for(sparsifier, shape))


def _running_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """parts[0] + parts[1] + ... in order (as a sum over a stacked first dimension), in one
    buffer."""
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total


def _last_block(read):
    """``read(start, stop)``, remembering the last block read."""
    last: list = [None, None]

    def cached(a: int, b: int) -> torch.Tensor:
        if last[0] != (a, b):
            last[0], last[1] = (a, b), read(a, b)
        return last[1]

    return cached


_GTA = {"weight": 1.0, "density": 1.0}
_SHARED = {"normalize": False, "rescale": False, "lambda_": 1.0, "int8_mask": False}
_LIMITS = {"weight": FINITE, "density": FRACTION, "lambda_": FINITE, "seed": SEED,
           "gamma": Limit(0.0, 1.0, hi_open=True), "epsilon": Limit(0.0, 0.5, hi_open=True)}


def _check_della(kwargs: Mapping[str, Any]) -> None:
    check_weight_sum(kwargs)
    for density, epsilon in zip(kwargs["density"], kwargs["epsilon"]):
        if density < 1 and not (
            0 < density - epsilon and density + epsilon < 1
        ):  # density 1 keeps all
            raise MergeConfigError(
                f"della needs density ± epsilon inside (0, 1); got density={density}, "
                f"epsilon={epsilon}: lower epsilon"
            )


@merge_method("task_arithmetic", paper="https://arxiv.org/abs/2212.04089", needs_base=True,
              model_params={"weight": 1.0}, shared_params=_SHARED, mergekit=True,
              limits=_LIMITS, check=check_weight_sum)
def task_arithmetic(
    base, models, *, weight, normalize=False, rescale=False, lambda_=1.0, int8_mask=False, out=None
):
    """Task arithmetic: base + λ Σ w_k τ_k (Ilharco et al., Editing Models with Task Arithmetic)."""
    return generalized_task_arithmetic(
        base, models, weight=weight, normalize=normalize, lambda_=lambda_, out=out
    )


@merge_method("ties", paper="https://arxiv.org/abs/2306.01708", needs_base=True, model_params=_GTA,
              shared_params={**_SHARED, "normalize": True}, mergekit=True,
              limits=_LIMITS, check=check_weight_sum)
def ties(
    base,
    models,
    *,
    weight,
    density,
    normalize=True,
    rescale=False,
    lambda_=1.0,
    int8_mask=False,
    out=None,
):
    """TIES: trim to the top-density magnitudes, elect signs, disjoint mean (Yadav et al.)."""
    return generalized_task_arithmetic(
        base,
        models,
        weight=weight,
        density=density,
        sparsifier="magnitude",
        consensus="sum",
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        out=out,
    )


@merge_method(
    "dare_ties",
    paper="https://arxiv.org/abs/2311.03099",
    needs_base=True,
    model_params=_GTA,
    shared_params={**_SHARED, "rescale": True, "seed": None},
    mergekit=True,
    limits=_LIMITS,
    check=check_weight_sum,
)
def dare_ties(
    base,
    models,
    *,
    weight,
    density,
    normalize=False,
    rescale=True,
    lambda_=1.0,
    int8_mask=False,
    seed=None,
    out=None,
):
    """DARE + TIES: random drop with rescale, then sign election (Yu et al., Language Models are
    Super Mario)."""
    return generalized_task_arithmetic(
        base,
        models,
        weight=weight,
        density=density,
        sparsifier="random",
        consensus="sum",
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        seed=seed,
        out=out,
    )


@merge_method(
    "dare_linear",
    paper="https://arxiv.org/abs/2311.03099",
    needs_base=True,
    model_params=_GTA,
    shared_params={**_SHARED, "rescale": True, "seed": None},
    mergekit=True,
    limits=_LIMITS,
    check=check_weight_sum,
)
def dare_linear(
    base,
    models,
    *,
    weight,
    density,
    normalize=False,
    rescale=True,
    lambda_=1.0,
    int8_mask=False,
    seed=None,
    out=None,
):
    """DARE: drop each task-vector entry with probability 1 − density and rescale the rest (Yu et
    al.)."""
    return generalized_task_arithmetic(
        base,
        models,
        weight=weight,
        density=density,
        sparsifier="random",
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        seed=seed,
        out=out,
    )


_CRUMBS = {**_GTA, "gamma": 0.01}


@merge_method(
    "breadcrumbs",
    paper="https://arxiv.org/abs/2312.06795",
    needs_base=True,
    model_params=_CRUMBS,
    shared_params=_SHARED,
    mergekit=True,
    limits=_LIMITS,
    check=check_weight_sum,
)
def breadcrumbs(
    base,
    models,
    *,
    weight,
    density,
    gamma,
    normalize=False,
    rescale=False,
    lambda_=1.0,
    int8_mask=False,
    out=None,
):
    """Model Breadcrumbs: drop the smallest entries and the largest outliers (fraction gamma)."""
    return generalized_task_arithmetic(
        base,
        models,
        weight=weight,
        density=density,
        gamma=gamma,
        sparsifier="magnitude_outliers",
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        out=out,
    )


@merge_method(
    "breadcrumbs_ties",
    paper="https://arxiv.org/abs/2312.06795",
    needs_base=True,
    model_params=_CRUMBS,
    shared_params=_SHARED,
    mergekit=True,
    limits=_LIMITS,
    check=check_weight_sum,
)
def breadcrumbs_ties(
    base,
    models,
    *,
    weight,
    density,
    gamma,
    normalize=False,
    rescale=False,
    lambda_=1.0,
    int8_mask=False,
    out=None,
):
    """Model Breadcrumbs sparsification followed by TIES sign election."""
    return generalized_task_arithmetic(
        base,
        models,
        weight=weight,
        density=density,
        gamma=gamma,
        sparsifier="magnitude_outliers",
        consensus="sum",
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        out=out,
    )


_DELLA = {**_GTA, "epsilon": 0.15}


@merge_method(
    "della",
    paper="https://arxiv.org/abs/2406.11617",
    needs_base=True,
    model_params=_DELLA,
    shared_params={**_SHARED, "normalize": True, "rescale": True, "seed": None},
    mergekit=True,
    limits=_LIMITS,
    check=_check_della,
)
def della(
    base,
    models,
    *,
    weight,
    density,
    epsilon,
    normalize=True,
    rescale=True,
    lambda_=1.0,
    int8_mask=False,
    seed=None,
    out=None,
):
    """DELLA: magnitude-ranked random drop (MagPrune), then TIES sign election (Deep et al.)."""
    return generalized_task_arithmetic(
        base,
        models,
        weight=weight,
        density=density,
        epsilon=epsilon,
        sparsifier="della",
        consensus="sum",
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        seed=seed,
        out=out,
    )


@merge_method(
    "della_linear",
    paper="https://arxiv.org/abs/2406.11617",
    needs_base=True,
    model_params=_DELLA,
    shared_params={**_SHARED, "rescale": True, "seed": None},
    mergekit=True,
    limits=_LIMITS,
    check=_check_della,
)
def della_linear(
    base,
    models,
    *,
    weight,
    density,
    epsilon,
    normalize=False,
    rescale=True,
    lambda_=1.0,
    int8_mask=False,
    seed=None,
    out=None,
):
    """DELLA's MagPrune without sign election."""
    return generalized_task_arithmetic(
        base,
        models,
        weight=weight,
        density=density,
        epsilon=epsilon,
        sparsifier="della",
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        seed=seed,
        out=out,
    )


@merge_method(
    "linear",
    paper="https://arxiv.org/abs/2203.05482",
    needs_base=False,
    model_params={"weight": 1.0},
    shared_params={"normalize": True},
    mergekit=True,
    limits=_LIMITS,
    check=check_weight_sum,
)
def linear(base, models, *, weight, normalize=True, out=None):
    """Weighted average of the models' weights (model soups, Wortsman et al.); the base is not
    used."""
    shape = common_shape(None, models)
    wd = work_dtype(*(m.dtype for m in models))
    w = torch.tensor(list(weight), dtype=wd)
    total = w.sum()

    def block(a: int, b: int) -> torch.Tensor:
        acc = sum(w[i] * read_rows(m, a, b, wd) for i, m in enumerate(models))
        return acc / total if normalize else acc

    return map_rows(shape, models[0].dtype, block, out)


from . import geometric, statistical  # noqa: E402,F401  (register their methods too)
