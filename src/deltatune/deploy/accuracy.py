"""Label-free accuracy estimation: average confidence, ATC, DoC and COT, with temperature scaling.

Fit once on labelled source validation outputs, then estimate the accuracy on any unlabelled
target outputs::

    est = fit_accuracy_estimator(val_logits, val_labels)  # temperature, ATC threshold, label prior
    est.estimate(target_logits)  # {"confidence": .., "atc": .., "doc": .., "cot": ..}

The estimators fail in different ways. Average confidence, DoC and ATC read each sample's
confidence, so they cannot see errors the model makes with full confidence (a model that maps a
whole corrupted set to one class, confidently). COT compares the *distribution* of the predictions
with the source label distribution, so it sees that collapse, but it assumes the target has the
source's label distribution, and a real label shift can throw it off either way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Sequence

import torch

from ..core.registry import Registry
from .batch import to_tensor
from .errors import DeployError

Score = Literal["entropy", "confidence"]
#: every label-free estimate by name: ``fn(estimator, target_logits) -> estimated accuracy``
ESTIMATORS: Registry[Callable[["AccuracyEstimator", torch.Tensor], float]] = Registry(
    "accuracy estimate", DeployError, message="unknown {kind} {name!r}; choose from {known}{hint}")


@ESTIMATORS.register("confidence")
def _confidence(est: "AccuracyEstimator", z: torch.Tensor) -> float:
    return float(scores(z, est.temperature, "confidence").mean())


@ESTIMATORS.register("atc")
def _atc(est: "AccuracyEstimator", z: torch.Tensor) -> float:
    return float((scores(z, est.temperature, est.score) > est.threshold).double().mean())


@ESTIMATORS.register("doc")
def _doc(est: "AccuracyEstimator", z: torch.Tensor) -> float:
    return est.source_accuracy - (est.source_confidence - _confidence(est, z))


@ESTIMATORS.register("cot")
def _cot(est: "AccuracyEstimator", z: torch.Tensor) -> float:
    return est.cot(z)


#: the estimate names, in the order reports list them
ESTIMATES: tuple[str, ...] = ESTIMATORS.names()


def _logits(value: Any, name: str) -> torch.Tensor:
    t = to_tensor(value).double()
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] < 2:
        raise DeployError(
            f"{name} must be logits of shape (samples, classes >= 2), got {tuple(t.shape)}"
        )
    if not torch.isfinite(t).all():
        raise DeployError(f"{name} holds NaN or inf values; drop those samples first")
    return t


def _labels(value: Any, n: int, classes: int) -> torch.Tensor:
    y = to_tensor(value).long().flatten()
    if y.numel() != n:
        raise DeployError(
            f"got {y.numel()} labels for {n} samples; pass one label per row of logits"
        )
    if (y < 0).any() or (y >= classes).any():
        raise DeployError(f"labels must be class indices in [0, {classes - 1}]")
    return y


def fit_temperature(logits: Any, labels: Any, *, max_iter: int = 200) -> float:
    """Temperature ``T`` minimising the NLL of ``softmax(logits / T)`` on labelled validation data.

    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017,
    https://arxiv.org/abs/1706.04599.
    """
    z = _logits(logits, "logits")
    y = _labels(labels, len(z), z.shape[1])
    log_t = torch.zeros(
        1, dtype=torch.float64, requires_grad=True
    )  # optimise log T: T stays positive
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().exp().clamp(1e-2, 1e2))


def scores(logits: torch.Tensor, temperature: float, kind: Score) -> torch.Tensor:
    """Per-sample confidence score: max probability, or negative entropy (ATC-NE)."""
    logp = (logits / temperature).log_softmax(-1)
    if kind == "confidence":
        return logp.exp().max(-1).values
    if kind == "entropy":
        return (logp.exp() * logp).sum(-1)
    raise DeployError(f"score must be 'entropy' or 'confidence', not {kind!r}")


@dataclass(frozen=True)
class AccuracyEstimator:
    """Label-free accuracy estimates from a fit on source validation data.

    - ``confidence``: the mean max-probability after temperature scaling.
    - ``atc``: Average Thresholded Confidence (Garg et al., ICLR 2022,
      https://arxiv.org/abs/2201.04234): the fraction of target samples whose score exceeds the
      threshold at which the source validation fraction equals the source accuracy.
    - ``doc``: Difference of Confidences (Guillory et al., ICCV 2021,
      https://arxiv.org/abs/2107.03315): source accuracy minus the drop in mean confidence from
      source to target.
    - ``cot``: Confidence Optimal Transport (Lu et al., NeurIPS 2023,
      https://arxiv.org/abs/2305.15640): one minus the optimal-transport cost between the target's
      softmax vectors and the source label distribution (one-hot vectors weighted by
      ``source_prior``), under the cost ``1 - p_y`` of sending prediction ``p`` to class ``y``. When
      the predicted classes follow the source prior it equals average confidence; when the model
      piles its predictions into few classes, the transport has to send them to other classes at a
      high cost, and the estimate drops. Assumes the target's label distribution is the source's.
      Needs the POT package (``deltatune[stats]``).
    """

    temperature: float
    threshold: float
    score: Score
    source_accuracy: float
    source_confidence: float
    source_prior: tuple[float, ...] = ()

    def estimate(self, logits: Any, methods: Sequence[str] = ESTIMATES) -> dict[str, float]:
        """Estimated accuracy (a fraction) of the model whose outputs are ``logits``, by each of
        ``methods``."""
        methods = (methods,) if isinstance(methods, str) else tuple(methods)
        chosen = {m: ESTIMATORS.get(m) for m in methods}  # every name checked before any work
        z = _logits(logits, "target logits")
        return {m: fn(self, z) for m, fn in chosen.items()}

    def cot(self, logits: Any) -> float:
        """COT's estimated accuracy of ``logits`` (see the class docs)."""
        z = _logits(logits, "target logits")
        if len(self.source_prior) != z.shape[1]:
            raise DeployError(
                f"the estimator was fitted for {len(self.source_prior)} classes, the logits have "
                f"{z.shape[1]}; fit it on this model's validation outputs"
            )
        return 1.0 - transport_cost((z / self.temperature).softmax(-1), self.source_prior)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def transport_cost(probs: torch.Tensor, prior: Sequence[float]) -> float:
    """Exact optimal-transport cost between the rows of ``probs`` (softmax vectors, equal weights)
    and the one-hot class vectors weighted by ``prior``, under the cost ``1 - p_y`` (POT's network
    simplex)."""
    try:
        import ot
    except ImportError as exc:
        raise DeployError(
            "COT needs the POT package: pip install 'deltatune[stats]' (or leave 'cot' out of "
            "methods)"
        ) from exc
    import numpy as np

    p = probs.detach().double().cpu().numpy()
    b = np.asarray(prior, dtype=np.float64)
    b = b / b.sum()
    cost = 1.0 - p
    plan, log = ot.emd(
        np.full(len(p), 1.0 / len(p)), b, cost, numItermax=max(100_000, 50 * p.size), log=True
    )
    if log.get("warning"):
        raise DeployError(f"the optimal transport for COT did not converge ({log['warning']}); "
                          "estimate on fewer samples at a time")
    return float((plan * cost).sum())


def _prior(value: Any, y: torch.Tensor, classes: int) -> tuple[float, ...]:
    if value is None:
        counts = torch.bincount(y, minlength=classes).double()
    else:
        counts = to_tensor(value).double().flatten()
        if (
            counts.numel() != classes
            or not torch.isfinite(counts).all()
            or (counts < 0).any()
            or counts.sum() <= 0
        ):
            raise DeployError(
                f"prior must be {classes} non-negative class frequencies (counts or shares), "
                f"got {counts.numel()} values"
            )
    return tuple(float(v) for v in counts / counts.sum())


def fit_accuracy_estimator(
    logits: Any, labels: Any, *, calibrate: bool = True, score: Score = "entropy", prior: Any = None
) -> AccuracyEstimator:
    """Fit temperature scaling (``calibrate``) and the ATC threshold on labelled source validation
    outputs. ``prior``: the source label distribution COT transports to (class counts or shares);
    by default the class frequencies of ``labels``."""
    z = _logits(logits, "validation logits")
    y = _labels(labels, len(z), z.shape[1])
    source_prior = _prior(prior, y, z.shape[1])
    t = fit_temperature(z, y) if calibrate else 1.0
    acc = float((z.argmax(-1) == y).double().mean())
    s = scores(z, t, score)
    # threshold: exactly round(acc * n) validation scores lie above it
    ordered = torch.sort(s, descending=True).values
    k = int(round(acc * len(s)))
    if k <= 0:
        threshold = float(ordered[0]) + 1e-12
    elif k >= len(s):
        threshold = float(ordered[-1]) - 1e-12
    else:
        threshold = float((ordered[k - 1] + ordered[k]) / 2)
    conf = float(scores(z, t, "confidence").mean())
    return AccuracyEstimator(t, threshold, score, acc, conf, source_prior)
