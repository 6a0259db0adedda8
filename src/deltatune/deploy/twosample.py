"""More two-sample shift tests for :func:`deltatune.deploy.detect`: least-squares density difference
(``lsdd``), Cramér-von Mises per feature (``cvm``) and a linear-time MMD on random Fourier
features (``mmd_rff``) that tests 100k reference samples in bounded memory.

Each returns ``(statistic, p_value, details)`` like the tests of :mod:`.stats`; inputs are float64
(n, d) and (m, d) tensors already checked by :mod:`.detect`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import DeployError
from .stats import TESTS, Correction, TestOutput, _scipy_stats, adjust_pvalues


def median_bandwidth(a: torch.Tensor, b: torch.Tensor | None = None, *, max_rows: int = 1000,
                     seed: int = 0) -> float:
    """Median pairwise distance (between ``a`` and ``b``, or within ``a``) on at most
    ``max_rows`` rows a side: the usual Gaussian-kernel bandwidth."""
    gen = torch.Generator().manual_seed(seed)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t[torch.randperm(len(t), generator=gen)[:max_rows]] if len(t) > max_rows else t

    a = pick(a)
    d = torch.cdist(a, pick(b) if b is not None else a)
    d = d[d > 0]
    return float(d.median()) if d.numel() else 1.0


def gauss(a: torch.Tensor, b: torch.Tensor, sigma: float, *, chunk: int = 4096) -> torch.Tensor:
    """Gaussian kernel matrix ``exp(-|a-b|² / (2σ²))``, computed in row chunks of ``a``."""
    rows = [torch.exp(-torch.cdist(a[i : i + chunk], b).pow(2) / (2 * sigma**2))
            for i in range(0, len(a), chunk)]
    return torch.cat(rows) if rows else torch.zeros(0, len(b), dtype=a.dtype)


# -- LSDD -----------------------------------------------------------------------------------------
class LSDDModel:
    """The density-difference model of LSDD: Gaussian kernels at ``centers``, the quadratic form
    ``M`` with ``LSDD(h) = hᵀ M h`` for ``h`` = mean kernel vector of sample 1 − of sample 2.

    Bu et al., "A pdf-Free Change Detection Test Based on Density Difference Estimation", IEEE TNNLS
    2018, https://doi.org/10.1109/TNNLS.2016.2619909; the least-squares density difference itself is
    Sugiyama et al. 2013, https://doi.org/10.1162/NECO_a_00492. The constant ``(πσ²)^{d/2}`` of the
    kernel integrals is dropped (it only rescales the statistic and ``lam``).
    """

    def __init__(self, centers: torch.Tensor, sigma: float, lam: float = 1e-3) -> None:
        self.centers, self.sigma, self.lam = centers, sigma, lam
        d2 = torch.cdist(centers, centers).pow(2)
        h = torch.exp(-d2 / (4 * sigma**2))  # ∫ k(x, c_l) k(x, c_l') dx, up to the constant
        a = torch.linalg.inv(h + lam * torch.eye(len(h), dtype=h.dtype))
        self.quadratic = 2 * a - a @ h @ a  # θ = A h, LSDD = 2 hᵀθ − θᵀ H θ = hᵀ (2A − AHA) h
        self.quadratic = (self.quadratic + self.quadratic.T) / 2

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return gauss(x, self.centers, self.sigma)

    def statistic(self, h: torch.Tensor) -> torch.Tensor:
        """LSDD for each row of ``h`` (…, L)."""
        return torch.einsum("...l,lk,...k->...", h, self.quadratic, h)


def standardiser(ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ref.mean(0), ref.std(0).clamp_min(1e-8)


@TESTS.register("lsdd")
def lsdd_test(x: torch.Tensor, y: torch.Tensor, *, n_permutations: int = 500,
              n_centers: int | None = None, lam: float = 1e-3, seed: int = 0) -> TestOutput:
    """Least-squares density difference with a permutation test. Features are standardised by the
    reference; ``n_centers`` kernel centres (default min(100, n/4)) are reference samples held out
    of the comparison (a centre inside its own sample would bias the statistic towards it)."""
    if n_permutations < 1:
        raise DeployError(f"lsdd: n_permutations={n_permutations} must be at least 1")
    n_c = n_centers if n_centers is not None else min(100, len(x) // 4)
    if n_c < 1 or len(x) - n_c < 2:
        raise DeployError(f"lsdd: the reference has {len(x)} samples, too few for {n_c} kernel "
                          "centres plus 2 to compare; give at least 8 reference samples")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    mu, sd = standardiser(x)
    x, y = (x - mu) / sd, (y - mu) / sd
    centers, x = x[perm[:n_c]], x[perm[n_c:]]
    model = LSDDModel(centers, median_bandwidth(x, centers, seed=seed), lam)
    kz = model.kernel(torch.cat([x, y]))  # (n + m, L)
    n = len(x)
    assign = torch.cat([
        (torch.arange(len(kz)) < n)[None],
        torch.argsort(torch.rand(n_permutations, len(kz), generator=gen), dim=1) < n,
    ]).to(kz.dtype)  # (1 + P, n + m): 1 = in the reference sample
    h = assign @ kz / n - (1 - assign) @ kz / (len(kz) - n)
    stats = model.statistic(h)
    p = (1 + int((stats[1:] >= stats[0]).sum())) / (1 + n_permutations)
    return float(stats[0]), p, {"bandwidth": model.sigma, "n_centers": n_c,
                                "null_statistics": stats[1:].tolist()}


# -- Cramér-von Mises ------------------------------------------------------------------------------
@TESTS.register("cvm")
def cvm_test(x: torch.Tensor, y: torch.Tensor, *, correction: Correction = "bonferroni",
             seed: int = 0) -> TestOutput:
    """One two-sample Cramér-von Mises test per feature (asymptotic p-values), combined by a
    multiple-testing correction like ``ks``; more sensitive than KS to differences spread over the
    whole distribution rather than at one point. Anderson 1962,
    https://doi.org/10.1214/aoms/1177704477.

    The statistic is a function of the ranks and its null assumes no ties; features with point
    masses (ReLU outputs are 0 half of the time) would get absurd statistics from mid-ranks, so ties
    are broken at random (seeded): under no shift the ranks are then exchangeable, and the test
    keeps its level (a randomised test)."""
    stats = _scipy_stats()
    xs, ys = x.numpy(), y.numpy()
    n = len(xs)
    rng = np.random.default_rng(seed)
    raw, values = np.ones(xs.shape[1]), np.zeros(xs.shape[1])
    for j in range(xs.shape[1]):
        pooled = np.concatenate([xs[:, j], ys[:, j]])
        if np.ptp(pooled) == 0:
            continue  # a constant feature carries no evidence
        ranks = np.empty(len(pooled))
        ranks[np.lexsort((rng.random(len(pooled)), pooled))] = np.arange(len(pooled))
        res = stats.cramervonmises_2samp(ranks[:n], ranks[n:], method="asymptotic")
        raw[j], values[j] = min(max(float(res.pvalue), 0.0), 1.0), float(res.statistic)
    adjusted = adjust_pvalues(raw, correction)
    worst = int(np.argmin(adjusted))
    return float(values[worst]), float(adjusted[worst]), {
        "correction": correction, "feature": worst, "adjusted_p_values": adjusted.tolist(),
    }


# -- MMD on random Fourier features ---------------------------------------------------------------
class FourierFeatures:
    """``φ(x) = sqrt(2/D) [cos(xΩ), sin(xΩ)]`` with ``Ω ~ N(0, σ⁻² I)``: ``φ(a)·φ(b)`` approximates
    the Gaussian kernel of bandwidth σ (Rahimi & Recht 2007,
    https://papers.nips.cc/paper/3182-random-features-for-large-scale-kernel-machines)."""

    def __init__(self, dim: int, sigma: float, n_features: int = 512, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.omega = torch.randn(dim, n_features // 2, generator=gen, dtype=torch.float64) / sigma
        self.scale = math.sqrt(2.0 / (2 * (n_features // 2)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        proj = x.to(torch.float64) @ self.omega
        return torch.cat([proj.cos(), proj.sin()], -1) * self.scale

    def moments(self, x: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of φ and of φφᵀ over the rows of ``x``, in chunks (memory: chunk × D + D²)."""
        total, outer = None, None
        for i in range(0, len(x), chunk):
            phi = self(x[i : i + chunk])
            s, o = phi.sum(0), phi.T @ phi
            total, outer = (s, o) if total is None else (total + s, outer + o)
        return total, outer


@TESTS.register("mmd_rff")
def mmd_rff_test(x: torch.Tensor, y: torch.Tensor, *, n_features: int = 512,
                 bandwidth: float | None = None, seed: int = 0) -> TestOutput:
    """Linear-time MMD: the squared distance between the mean random Fourier features of the two
    samples. Under no shift the difference of the means is about N(0, Σ·(1/n + 1/m)) with Σ the
    pooled covariance of the features, so the statistic is a weighted sum of χ²₁ (weights: the
    eigenvalues of that covariance); its p-value comes from the moment-matched scaled χ²
    (Satterthwaite). Cost O((n + m)·D), memory O(chunk·D + D²): call
    ``detect(..., max_samples=None)`` to use every reference sample (100k in well under 2 GB).
    Zhao & Meng, "FastMMD", 2015, https://arxiv.org/abs/1405.2664."""
    if n_features < 2:
        raise DeployError(f"mmd_rff: n_features={n_features} must be at least 2 (use 512)")
    sigma = bandwidth if bandwidth is not None else median_bandwidth(x, y, seed=seed)
    rff = FourierFeatures(x.shape[1], sigma, n_features, seed)
    (sx, ox), (sy, oy) = rff.moments(x), rff.moments(y)
    n, m = len(x), len(y)
    diff = sx / n - sy / m
    stat = float(diff @ diff)
    mean = (sx + sy) / (n + m)
    cov = (ox + oy) / (n + m) - torch.outer(mean, mean)  # pooled covariance of φ under H0
    # Σ λ_i z_i² ≈ a·χ²_ν with the same mean and variance: a = Σλ²/Σλ, ν = (Σλ)²/Σλ²
    trace, trace2 = float(torch.diagonal(cov).sum()), float((cov * cov).sum())
    scale = (1 / n + 1 / m) * trace2 / max(trace, 1e-300)
    dof = trace**2 / max(trace2, 1e-300)
    p = float(_scipy_stats().chi2.sf(stat / max(scale, 1e-300), dof))
    return stat, p, {"bandwidth": sigma, "n_features": 2 * (n_features // 2), "dof": dof}
