"""Label-shift estimation: the target's class prior from the model's outputs, and the corrected
predictions ``p_t(y|x) ∝ w_y · p_s(y|x)`` with ``w = π_t / π_s``.

    ls = dd.estimate_label_shift(val_logits, val_labels, target_logits, method="rlls")
    ls.prior                      # estimated target class prior (C,)
    probs = ls.correct(target_logits)   # re-weighed posteriors

Three estimators, all under the label-shift assumption (``p(x|y)`` unchanged):

- ``bbse``: black-box shift estimation (Lipton et al., ICML 2018,
  https://arxiv.org/abs/1802.03916): solve ``C w = μ`` where ``C`` is the joint distribution of
  (prediction, label) on labelled source validation data and ``μ`` the target's prediction
  distribution; consistent for any fixed classifier whose confusion matrix is invertible.
- ``rlls``: regularised learning under label shift (Azizzadenesheli et al., ICLR 2019,
  https://arxiv.org/abs/1903.09734): ``θ = argmin ‖Cθ − b‖ + Δ‖θ‖`` with ``w = 1 + θ ≥ 0`` and
  ``b = μ − C·1``: shrinks towards "no shift" when ``C`` is poorly estimated (few validation
  samples, classes the model confuses), where BBSE's inverse blows up.
- ``em``: EM over calibrated source posteriors (Saerens et al. 2002), as the ``em`` wrapper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .accuracy import fit_temperature
from .batch import to_tensor
from .errors import DeployError
from .output import em_prior

Estimator = Literal["bbse", "rlls", "em"]
ESTIMATORS_LS: tuple[str, ...] = ("bbse", "rlls", "em")


@dataclass(frozen=True)
class LabelShift:
    """An estimated label shift: ``prior`` (target), ``source_prior``, ``weights`` = their ratio."""

    method: str
    prior: torch.Tensor
    source_prior: torch.Tensor
    weights: torch.Tensor
    temperature: float = 1.0

    def correct(self, logits: Any) -> torch.Tensor:
        """Posteriors re-weighed for the target prior, ``p_t(y|x) ∝ w_y p_s(y|x)`` (probabilities,
        one row per input)."""
        z = _matrix(logits, "logits", len(self.weights))
        p = (z / self.temperature).softmax(-1) * self.weights
        return p / p.sum(-1, keepdim=True).clamp_min(1e-300)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "prior": self.prior.tolist(),
                "source_prior": self.source_prior.tolist(), "weights": self.weights.tolist(),
                "temperature": self.temperature}


def _matrix(value: Any, name: str, classes: int | None = None) -> torch.Tensor:
    t = to_tensor(value).double()
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] < 2:
        raise DeployError(f"{name} must have shape (samples, classes >= 2), got {tuple(t.shape)}")
    if classes is not None and t.shape[1] != classes:
        raise DeployError(f"{name} have {t.shape[1]} classes, the estimate {classes}; use the "
                          "same model's outputs")
    if not torch.isfinite(t).all():
        raise DeployError(f"{name} hold NaN or inf values; drop those samples first")
    return t


def confusion_joint(predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """``C[i, j] = P(prediction = i, label = j)`` from hard predictions."""
    c = torch.zeros(classes, classes, dtype=torch.float64)
    c.index_put_((predicted, labels), torch.ones(len(labels), dtype=torch.float64),
                 accumulate=True)
    return c / len(labels)


def _rlls_theta(c: torch.Tensor, b: torch.Tensor, delta: float) -> torch.Tensor:
    """``argmin_θ ‖Cθ − b‖₂ + Δ‖θ‖₂`` subject to ``θ ≥ −1`` (SLSQP on the smoothed norms)."""
    import numpy as np
    from scipy.optimize import minimize

    cn, bn = c.numpy(), b.numpy()
    eps = 1e-12

    def objective(theta: np.ndarray) -> float:
        return float(np.sqrt(np.sum((cn @ theta - bn) ** 2) + eps)
                     + delta * np.sqrt(np.sum(theta**2) + eps))

    def gradient(theta: np.ndarray) -> np.ndarray:
        r = cn @ theta - bn
        return cn.T @ r / np.sqrt(np.sum(r**2) + eps) + delta * theta / np.sqrt(
            np.sum(theta**2) + eps)

    res = minimize(objective, np.zeros(len(bn)), jac=gradient, method="SLSQP",
                   bounds=[(-1.0, None)] * len(bn), options={"maxiter": 500, "ftol": 1e-12})
    return torch.from_numpy(res.x)


def estimate_label_shift(val_logits: Any, val_labels: Any, target_logits: Any,
                         method: Estimator = "bbse", *, source_prior: Any = None,
                         calibrate: bool = True, delta: float = 0.05,
                         regularization: float | None = None) -> LabelShift:
    """Estimate the target class prior from labelled source validation outputs and unlabelled
    target outputs (logits). ``source_prior``: the training label distribution (default: the
    validation label frequencies). ``calibrate`` fits a temperature on the validation outputs
    (EM needs calibrated posteriors; BBSE/RLLS only use the argmax and ignore it for the prior).
    RLLS's ``regularization`` Δ defaults to ``sqrt(log(2C/δ) / n_val) / C``: the order of the
    confusion matrix's estimation error, on the scale of its entries (joint probabilities whose
    columns sum to about 1/C); set on synthetic data (tests/test_deploy_drift.py), where the
    paper's unscaled Δ shrank every estimate back to the source prior."""
    if method not in ESTIMATORS_LS:
        raise DeployError(f"unknown label-shift estimator {method!r}; choose from "
                          f"{', '.join(ESTIMATORS_LS)}")
    zv = _matrix(val_logits, "validation logits")
    k = zv.shape[1]
    zt = _matrix(target_logits, "target logits", k)
    y = to_tensor(val_labels).long().flatten()
    if y.numel() != len(zv):
        raise DeployError(f"got {y.numel()} validation labels for {len(zv)} rows of logits")
    if (y < 0).any() or (y >= k).any():
        raise DeployError(f"validation labels must be class indices in [0, {k - 1}]")
    if source_prior is None:
        ps = torch.bincount(y, minlength=k).double() / len(y)
    else:
        ps = to_tensor(source_prior).double().flatten()
        if ps.numel() != k or (ps < 0).any() or ps.sum() <= 0:
            raise DeployError(f"source_prior must be {k} non-negative class frequencies")
        ps = ps / ps.sum()
    if (ps == 0).any():
        missing = int((ps == 0).nonzero()[0])
        raise DeployError(f"class {missing} has no validation sample (source prior 0); its "
                          "shift cannot be estimated: add validation samples of every class")
    t = fit_temperature(zv, y) if calibrate else 1.0
    if method == "em":
        prior = em_prior((zt / t).softmax(-1), ps)
    else:
        c = confusion_joint(zv.argmax(-1), y, k)
        # the joint was taken at the validation prior; rescale columns to the source prior
        c = c / (torch.bincount(y, minlength=k).double() / len(y)) * ps
        mu = torch.bincount(zt.argmax(-1), minlength=k).double() / len(zt)
        if method == "bbse":
            w = torch.linalg.lstsq(c, mu[:, None]).solution[:, 0]
        else:
            reg = (regularization if regularization is not None
                   else math.sqrt(math.log(2 * k / delta) / len(y)) / k)
            w = 1 + _rlls_theta(c, mu - c.sum(1), reg)
        w = w.clamp_min(0)
        prior = w * ps
        if prior.sum() <= 0:
            prior = ps.clone()
    prior = prior / prior.sum()
    return LabelShift(method, prior, ps, prior / ps, t)
