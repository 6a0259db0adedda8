"""Label-free accuracy estimation: average confidence, ATC, DoC, with temperature scaling.

Fit once on labelled source validation outputs, then estimate the accuracy on any unlabelled
target outputs::

    est = fit_accuracy_estimator(val_logits, val_labels)      # temperature + ATC threshold
    est.estimate(target_logits)                                # {"confidence": .., "atc": .., "doc": ..}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from .batch import to_tensor
from .errors import DeployError

Score = Literal["entropy", "confidence"]


def _logits(value: Any, name: str) -> torch.Tensor:
    t = to_tensor(value).double()
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] < 2:
        raise DeployError(f"{name} must be logits of shape (samples, classes >= 2), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise DeployError(f"{name} holds NaN or inf values; drop those samples first")
    return t


def _labels(value: Any, n: int, classes: int) -> torch.Tensor:
    y = to_tensor(value).long().flatten()
    if y.numel() != n:
        raise DeployError(f"got {y.numel()} labels for {n} samples; pass one label per row of logits")
    if (y < 0).any() or (y >= classes).any():
        raise DeployError(f"labels must be class indices in [0, {classes - 1}]")
    return y


def fit_temperature(logits: Any, labels: Any, *, max_iter: int = 200) -> float:
    """Temperature ``T`` minimising the NLL of ``softmax(logits / T)`` on labelled validation data.

    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017, https://arxiv.org/abs/1706.04599.
    """
    z = _logits(logits, "logits")
    y = _labels(labels, len(z), z.shape[1])
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # optimise log T: T stays positive
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
    - ``doc``: Difference of Confidences (Guillory et al., ICCV 2021, https://arxiv.org/abs/2107.03315):
      source accuracy minus the drop in mean confidence from source to target.
    """

    temperature: float
    threshold: float
    score: Score
    source_accuracy: float
    source_confidence: float

    def estimate(self, logits: Any) -> dict[str, float]:
        z = _logits(logits, "target logits")
        conf = float(scores(z, self.temperature, "confidence").mean())
        atc = float((scores(z, self.temperature, self.score) > self.threshold).double().mean())
        return {"confidence": conf, "atc": atc, "doc": self.source_accuracy - (self.source_confidence - conf)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_accuracy_estimator(
    logits: Any, labels: Any, *, calibrate: bool = True, score: Score = "entropy"
) -> AccuracyEstimator:
    """Fit temperature scaling (``calibrate``) and the ATC threshold on labelled source validation outputs."""
    z = _logits(logits, "validation logits")
    y = _labels(labels, len(z), z.shape[1])
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
    return AccuracyEstimator(t, threshold, score, acc, conf)
