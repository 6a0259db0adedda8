"""Two-sample tests on features or model outputs. Each returns ``(statistic, p_value, details)``.

Inputs are float64 tensors of shape (n, d) and (m, d) already checked by :mod:`.detect`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import numpy as np
import torch

from ..core.registry import Registry
from .errors import DeployError

Correction = Literal["bonferroni", "bh"]
TestOutput = tuple[float, float, dict[str, Any]]
#: every two-sample shift test by name: ``fn(x, y, **options) -> (statistic, p-value, details)``
TESTS: Registry[Callable[..., TestOutput]] = Registry("shift test", DeployError)


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError as exc:  # pragma: no cover - scipy is in the [stats] extra
        raise DeployError("this test needs scipy; pip install 'deltatune[stats]'") from exc
    return stats


def rbf_kernel(z: torch.Tensor, bandwidth: float | None = None) -> tuple[torch.Tensor, float]:
    """Gaussian kernel matrix ``exp(-|a-b|² / (2σ²))``; σ by the median heuristic when not given."""
    d2 = torch.cdist(z, z).pow(2)
    if bandwidth is None:
        off = d2[~torch.eye(len(z), dtype=torch.bool)]
        off = off[off > 0]
        bandwidth = math.sqrt(float(off.median())) if off.numel() else 1.0
    return torch.exp(-d2 / (2 * bandwidth**2)), float(bandwidth)


def _mmd2_many(k: torch.Tensor, is_x: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² for each row of the 0/1 assignment matrix ``is_x`` (B, n+m) over kernel
    ``k``."""
    a = is_x.to(k.dtype)
    b = 1 - a
    n, m = a.sum(1), b.sum(1)
    diag = torch.diagonal(k)
    ka, kb = a @ k, b @ k  # (B, n+m)
    xx = ((ka * a).sum(1) - a @ diag) / (n * (n - 1))
    yy = ((kb * b).sum(1) - b @ diag) / (m * (m - 1))
    xy = (ka * b).sum(1) / (n * m)
    return xx + yy - 2 * xy


@TESTS.register("mmd")
def mmd_test(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_permutations: int = 500,
    bandwidth: float | None = None,
    seed: int = 0,
) -> TestOutput:
    """Kernel two-sample test: unbiased MMD² with a Gaussian kernel (median heuristic bandwidth) and
    a permutation test. Gretton et al., "A Kernel Two-Sample Test", JMLR 2012,
    https://jmlr.org/papers/v13/gretton12a.html.
    """
    if n_permutations < 1:
        raise DeployError(
            f"mmd: n_permutations={n_permutations} must be at least 1 (use 200 or more)"
        )
    z = torch.cat([x, y])
    k, sigma = rbf_kernel(z, bandwidth)
    n = len(x)
    observed = torch.zeros(1, len(z), dtype=torch.bool)
    observed[0, :n] = True
    gen = torch.Generator().manual_seed(seed)
    perms = (
        torch.argsort(torch.rand(n_permutations, len(z), generator=gen), dim=1) < n
    )  # n random "x" per row
    stats = _mmd2_many(k, torch.cat([observed, perms]))
    stat, null = float(stats[0]), stats[1:]
    p = (1 + int((null >= stats[0]).sum())) / (1 + n_permutations)
    return stat, p, {"bandwidth": sigma, "null_statistics": null.tolist()}


def adjust_pvalues(p: np.ndarray, correction: Correction) -> np.ndarray:
    """Multiple-testing adjusted p-values: Bonferroni (family-wise) or Benjamini-Hochberg (FDR)."""
    p = np.asarray(p, dtype=np.float64)
    d = len(p)
    if correction == "bonferroni":
        return np.minimum(1.0, p * d)
    if correction == "bh":
        order = np.argsort(p)
        ranked = p[order] * d / np.arange(1, d + 1)
        ranked = np.minimum.accumulate(ranked[::-1])[::-1]  # monotone step-up
        out = np.empty(d)
        out[order] = np.minimum(1.0, ranked)
        return out
    raise DeployError(f"correction must be 'bonferroni' or 'bh', not {correction!r}")


@TESTS.register("ks")
def ks_test(
    x: torch.Tensor, y: torch.Tensor, *, correction: Correction = "bonferroni"
) -> TestOutput:
    """One Kolmogorov-Smirnov test per feature, combined by a multiple-testing correction; the
    p-value is the smallest adjusted one. Rabanser et al., "Failing Loudly", NeurIPS 2019,
    https://arxiv.org/abs/1810.11953.
    """
    res = _scipy_stats().ks_2samp(x.numpy(), y.numpy(), axis=0)
    raw = np.atleast_1d(np.nan_to_num(res.pvalue, nan=1.0))
    adjusted = adjust_pvalues(raw, correction)
    worst = int(np.argmin(adjusted))
    return float(np.atleast_1d(res.statistic)[worst]), float(adjusted[worst]), {
        "correction": correction, "feature": worst, "adjusted_p_values": adjusted.tolist(),
    }


def to_probs(outputs: torch.Tensor) -> torch.Tensor:
    """Rows that already are probability vectors stay; anything else is treated as logits."""
    sums = outputs.sum(-1)
    is_simplex = bool((outputs >= 0).all()) and torch.allclose(
        sums, torch.ones_like(sums), atol=1e-4
    )
    return outputs if is_simplex else outputs.softmax(-1)


@TESTS.register("bbsd")
def bbsd_test(
    x: torch.Tensor, y: torch.Tensor, *, correction: Correction = "bonferroni"
) -> TestOutput:
    """Black-box shift detection: per-class KS tests on the softmax outputs of the model.
    Lipton et al., "Detecting and Correcting for Label Shift with Black Box Predictors", ICML 2018,
    https://arxiv.org/abs/1802.03916 (BBSDs in Rabanser et al. 2019).
    """
    if x.shape[1] < 2:
        raise DeployError(
            "bbsd needs model outputs with one column per class (logits or probabilities)"
        )
    return ks_test(to_probs(x), to_probs(y), correction=correction)


def _labels(v: torch.Tensor) -> torch.Tensor:
    if v.shape[1] == 1:
        lab = v[:, 0]
        if not torch.equal(lab, lab.round()) or (lab < 0).any():
            raise DeployError(
                "label test: 1-column input must hold class indices (non-negative integers)"
            )
        return lab.long()
    return v.argmax(1)


@TESTS.register("label")
def label_test(x: torch.Tensor, y: torch.Tensor) -> TestOutput:
    """Label-shift test: chi-squared test of homogeneity on the predicted label counts
    (the "BBSDh" test of Rabanser et al. 2019). Inputs are outputs (argmax taken) or label columns.
    """
    lx, ly = _labels(x), _labels(y)
    c = int(max(lx.max(), ly.max())) + 1
    table = np.stack([np.bincount(lx.numpy(), minlength=c), np.bincount(ly.numpy(), minlength=c)])
    table = table[:, table.sum(0) > 0]  # classes never predicted carry no evidence
    if table.shape[1] < 2:
        return 0.0, 1.0, {"counts": table.tolist()}
    res = _scipy_stats().chi2_contingency(table)
    return float(res.statistic), float(res.pvalue), {"counts": table.tolist(), "dof": int(res.dof)}


@TESTS.register("classifier")
def classifier_test(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int = 0,
    hidden: int = 0,
    epochs: int = 200,
    weight_decay: float = 1e-3,
) -> TestOutput:
    """Classifier two-sample test: train a classifier (logistic regression, or an MLP with
    ``hidden`` units) to tell the samples apart on one half, test its accuracy on the other half;
    under no shift the held-out accuracy is Binomial(n, 1/2). Lopez-Paz & Oquab, "Revisiting
    Classifier Two-Sample Tests", ICLR 2017, https://arxiv.org/abs/1610.06545.
    """
    gen = torch.Generator().manual_seed(seed)
    size = min(len(x), len(y))  # balanced: chance accuracy is exactly 1/2
    x = x[torch.randperm(len(x), generator=gen)[:size]]
    y = y[torch.randperm(len(y), generator=gen)[:size]]
    z = torch.cat([x, y]).float()
    t = torch.cat([torch.zeros(size), torch.ones(size)])
    perm = torch.randperm(2 * size, generator=gen)
    z, t = z[perm], t[perm]
    half = size  # train on the first half, test on the second
    mu, sd = z[:half].mean(0), z[:half].std(0).clamp_min(1e-6)
    z = (z - mu) / sd
    torch.manual_seed(seed)
    d = z.shape[1]
    nn = torch.nn
    net = (
        nn.Linear(d, 1)
        if hidden <= 0
        else nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(epochs):  # full-batch: the samples are small
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(
                net(z[:half]).squeeze(-1), t[:half]
            ).backward()
            opt.step()
    with torch.no_grad():
        correct = int(((net(z[half:]).squeeze(-1) > 0).float() == t[half:]).sum())
    n_test = 2 * size - half
    p = float(_scipy_stats().binomtest(correct, n_test, 0.5, alternative="greater").pvalue)
    return correct / n_test, p, {"n_test": n_test}

