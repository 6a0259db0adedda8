"""The per-input OOD scores themselves: what each reads, what it fits on the reference, how it
scores (higher = more unusual). One :class:`ScoreMethod` per rule in the :data:`SCORES` registry;
:mod:`.ood` holds the scorer that fits, saves and applies them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..core.registry import Registry
from .errors import DeployError


@dataclass(frozen=True)
class ScoreMethod:
    """One scoring rule: what it reads, how it fits (tensors to keep) and how it scores."""

    needs: tuple[str, ...]  # "features", "logits", "head"
    fit: Callable[..., dict[str, torch.Tensor]]
    score: Callable[..., torch.Tensor]
    options: dict[str, Any] = field(default_factory=dict)
    paper: str = ""


#: every per-input OOD score by name
SCORES: Registry[ScoreMethod] = Registry(
    "OOD score", DeployError, message="unknown {kind} {name!r}{hint}; choose from {known}"
)


# -- the scores -----------------------------------------------------------------------------------
def _fit_nothing(**_: Any) -> dict[str, torch.Tensor]:
    return {}


def _msp(state: dict, logits: torch.Tensor, temperature: float = 1.0, **_: Any) -> torch.Tensor:
    return -(logits / temperature).softmax(-1).max(-1).values


def _energy(state: dict, logits: torch.Tensor, temperature: float = 1.0, **_: Any) -> torch.Tensor:
    return -temperature * torch.logsumexp(logits / temperature, -1)


SCORES.register("msp", ScoreMethod(
    ("logits",), _fit_nothing, _msp, {"temperature": 1.0},
    "Hendrycks & Gimpel 2017, https://arxiv.org/abs/1610.02136"))
SCORES.register("energy", ScoreMethod(
    ("logits",), _fit_nothing, _energy, {"temperature": 1.0},
    "Liu et al. 2020, https://arxiv.org/abs/2010.03759"))


def _fit_mahalanobis(features: torch.Tensor, labels: torch.Tensor, shrinkage: float = 1e-6,
                     **_: Any) -> dict[str, torch.Tensor]:
    """Class means and one shared (tied) covariance, as in Lee et al.; classes absent from the
    reference get no Gaussian (an input can only be close to a class that was seen)."""
    classes = torch.unique(labels)
    means = torch.stack([features[labels == c].mean(0) for c in classes])  # (C, d)
    centred = features - means[torch.searchsorted(classes, labels)]
    cov = centred.T @ centred / len(features)  # (d, d)
    # shrink towards a scaled identity: a reference smaller than the width is singular otherwise
    ridge = shrinkage * float(torch.diagonal(cov).mean().clamp_min(1e-12))
    precision = torch.linalg.pinv(cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype),
                                  hermitian=True)
    return {"means": means, "precision": precision, "classes": classes}


def _mahalanobis(state: dict, features: torch.Tensor, **_: Any) -> torch.Tensor:
    diff = features[:, None, :] - state["means"][None]  # (N, C, d)
    d2 = torch.einsum("ncd,de,nce->nc", diff, state["precision"], diff)
    return d2.min(-1).values


SCORES.register("mahalanobis", ScoreMethod(
    ("features", "labels"), _fit_mahalanobis, _mahalanobis, {"shrinkage": 1e-6},
    "Lee et al. 2018, https://arxiv.org/abs/1807.03888 (without input pre-processing)"))


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (kNN compares directions, as Sun et al.)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _fit_knn(features: torch.Tensor, k: int = 10, max_reference: int = 20000, seed: int = 0,
             **_: Any) -> dict[str, torch.Tensor]:
    if len(features) <= k:
        raise DeployError(f"knn: the reference has {len(features)} samples, not more than k={k}; "
                          "give more reference samples or a smaller k")
    if len(features) > max_reference:  # Sun et al. subsample the bank too (their α)
        gen = torch.Generator().manual_seed(seed)
        features = features[torch.randperm(len(features), generator=gen)[:max_reference]]
    return {"bank": unit(features).float()}


def kth_distance(queries: torch.Tensor, bank: torch.Tensor, k: int, *, skip_self: bool = False,
                 chunk: int = 1024) -> torch.Tensor:
    """Distance from each (normalised) query to its ``k``-th nearest row of ``bank``, in chunks
    so that memory is ``chunk × len(bank)``; ``skip_self`` when the queries are the bank itself."""
    kk = k + 1 if skip_self else k
    out = []
    for i in range(0, len(queries), chunk):
        d = torch.cdist(queries[i : i + chunk].float(), bank)
        out.append(d.topk(kk, dim=-1, largest=False).values[:, -1])
    return torch.cat(out).double()


def _knn(state: dict, features: torch.Tensor, k: int = 10, **_: Any) -> torch.Tensor:
    return kth_distance(unit(features), state["bank"], k)


SCORES.register("knn", ScoreMethod(
    ("features",), _fit_knn, _knn, {"k": 10, "max_reference": 20000, "seed": 0},
    "Sun et al. 2022, https://arxiv.org/abs/2204.06507"))


def _fit_vim(features: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor, dim: int | None = None, **_: Any) -> dict[str, torch.Tensor]:
    """ViM: the origin that makes the head bias-free, the principal subspace of the centred
    reference features, and the scale α that puts the virtual logit on the logits' scale."""
    d = features.shape[1]
    if dim is None:  # the paper's choice for wide features; half the width for narrow ones
        dim = 1000 if d >= 2048 else 512 if d >= 768 else max(1, d // 2)
    if not 0 < dim < d:
        raise DeployError(f"vim: dim={dim} must lie in [1, {d - 1}] (the feature width is {d})")
    origin = -torch.linalg.pinv(weight) @ bias  # (d,)
    centred = features - origin
    _, vecs = torch.linalg.eigh(centred.T @ centred / len(centred))  # ascending eigenvalues
    residual = vecs[:, : d - dim]  # (d, d - dim): the directions the reference barely uses
    vlogit = (centred @ residual).norm(dim=-1)
    alpha = logits.max(-1).values.mean() / vlogit.mean().clamp_min(1e-12)
    return {"origin": origin, "residual": residual, "alpha": alpha.reshape(1)}


def _vim(state: dict, features: torch.Tensor, logits: torch.Tensor, **_: Any) -> torch.Tensor:
    vlogit = ((features - state["origin"]) @ state["residual"]).norm(dim=-1) * state["alpha"]
    # the virtual logit joins the class logits; the score is its softmax probability, as a logit
    return vlogit - torch.logsumexp(logits, -1)


SCORES.register("vim", ScoreMethod(
    ("features", "logits", "head"), _fit_vim, _vim, {"dim": None},
    "Wang et al. 2022, https://arxiv.org/abs/2203.10807"))
