"""Online drift detectors calibrated to an expected run-time (ERT).

A window of the latest ``window`` samples is compared with the reference after *every* sample; the
statistic (MMD² or LSDD) is updated in O(window) work per sample. There is no p-value: the alarm
threshold is set by simulation so that on clean data the detector runs ``ert`` samples on average
before its first (false) alarm, the design of alibi-detect's online detectors (Cobb et al.,
"Sequential Multivariate Change Detection with Calibrated and Memoryless False Detection Rates",
AISTATS 2022, https://arxiv.org/abs/2108.00883).

How the threshold is set: the reference is split once into the part the statistic compares with
and a *calibration pool*. Clean streams are simulated by drawing from the pool (random
permutations, concatenated), the statistic is computed along each, and the threshold is the value
at which the mean run-time to the first crossing equals ``ert`` (streams that never cross are
counted as censored, the exponential-tail estimate). The same statistic code then runs on the live
stream, so the simulation and the deployment differ only in where the clean samples come from.

    det = dd.OnlineMMD(reference_features, ert=500, window=50)
    for x in stream:                       # features of one or more samples
        for event in det.update(x):
            if event["drift"]: ...          # then det.reset() to watch again
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from .detect import as_samples
from .errors import DeployError
from .twosample import LSDDModel, gauss, median_bandwidth, standardiser


class OnlineDetector:
    """Common machinery: input checks, the reference split, simulation-based calibration,
    per-sample updates. Subclasses define the statistic (``_prepare``, ``_embed``, ``_paths``,
    ``_step``)."""

    kind = "online"

    def __init__(self, reference: Any, *, ert: float, window: int, n_bootstraps: int = 400,
                 calibration_size: int | None = None, horizon: float = 4.0, seed: int = 0
                 ) -> None:
        if window < 2:
            raise DeployError(f"window={window} must be at least 2 samples")
        if not ert > window:
            raise DeployError(
                f"ert={ert} is not above the window size {window}: the detector cannot alarm "
                "before its window is full; raise --ert or lower --window")
        if n_bootstraps < 50:
            raise DeployError(f"n_bootstraps={n_bootstraps} must be at least 50 (use 400 or more)")
        ref = as_samples(reference, "reference")
        need = 4 * window
        if len(ref) < need:
            raise DeployError(
                f"the reference has {len(ref)} samples; online {self.kind} with window {window} "
                f"needs at least {need} (half to compare with, half to simulate clean streams); "
                "give more reference samples or a smaller window")
        self.ert, self.window, self.seed = float(ert), int(window), seed
        self.width = ref.shape[1]
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(ref), generator=gen)
        n_cal = calibration_size or min(len(ref) // 2, 4000)
        if not window * 2 <= n_cal <= len(ref) - window:
            raise DeployError(f"calibration_size={n_cal} must lie in [{2 * window}, "
                              f"{len(ref) - window}]")
        pool, kept = ref[perm[:n_cal]], ref[perm[n_cal:]]
        self._prepare(kept)
        self.threshold, self.calibration = self._calibrate(pool, n_bootstraps, horizon, gen)
        self.reset()

    # -- the statistic, defined by subclasses --------------------------------------------------
    def _prepare(self, reference: torch.Tensor) -> None:
        raise NotImplementedError

    def _paths(self, pool: torch.Tensor, streams: torch.Tensor, calibrate: bool = False
               ) -> torch.Tensor:
        """Statistic after each sample of each stream (B, T - window + 1), the first value for the
        first full window; ``streams`` are row indices into ``pool``.

        With ``calibrate`` the streams recycle the calibration pool, whose own sampling error would
        otherwise count twice: the windows are compared with the mixture ``s·m_R + (1-s)·m_P`` of
        the reference's and the pool's mean embeddings, ``s² = |P| / (|R| + |P|)``, so that the
        offset between the compared-with mean and the windows' long-run mean has the variance it
        has for live data (the reference's error only). Without it the simulated statistic runs
        high and the live run-time comes out 20-40% above the ERT."""
        raise NotImplementedError

    def _new_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _step(self, state: dict[str, Any], x: torch.Tensor) -> float | None:
        """Add one sample (d,), return the statistic once the window is full."""
        raise NotImplementedError

    # -- calibration ---------------------------------------------------------------------------
    def _streams(self, n: int, b: int, length: int, gen: torch.Generator) -> torch.Tensor:
        reps = -(-length // n)
        rows = [torch.cat([torch.randperm(n, generator=gen) for _ in range(reps)])[:length]
                for _ in range(b)]
        return torch.stack(rows)

    def _calibrate(self, pool: torch.Tensor, b: int, horizon: float, gen: torch.Generator
                   ) -> tuple[float, dict[str, Any]]:
        length = int(max(horizon * self.ert, 4 * self.window))
        with one_thread():
            paths = self._paths(pool, self._streams(len(pool), b, length, gen), calibrate=True)
            running = torch.cummax(paths, dim=1).values  # first crossing = running max > τ
            lo, hi = float(paths.min()), float(running[:, -1].max())
            for _ in range(60):  # bisection: the mean run-time grows with the threshold
                mid = (lo + hi) / 2
                if mean_run_time(running, mid, self.window) < self.ert:
                    lo = mid
                else:
                    hi = mid
        return hi, {"n_bootstraps": b, "stream_length": length, "pool": len(pool),
                    "simulated_ert": mean_run_time(running, hi, self.window)}

    def run_times(self, pool: Any, *, n_streams: int = 100, length: int | None = None,
                  seed: int = 0, prefix: Any = None) -> torch.Tensor:
        """Samples until the first alarm on ``n_streams`` streams drawn from ``pool`` (random
        permutations, concatenated to ``length``, default 4·ert); ``inf`` where none came. With
        ``prefix`` (clean samples, at least ``window``), each stream starts with its own random
        ``window`` of them, so a change comes after a full clean window; subtract ``window`` for
        the delay. This is the detector's own statistic, vectorised over streams (the same values
        as ``update``)."""
        data = as_samples(pool, "pool")
        if data.shape[1] != self.width:
            raise DeployError(f"the pool has {data.shape[1]} features, the reference "
                              f"{self.width}; compute both the same way")
        length = length or int(4 * self.ert)
        gen = torch.Generator().manual_seed(seed)
        streams = self._streams(len(data), n_streams, length, gen)
        if prefix is not None:
            head = as_samples(prefix, "prefix")
            if len(head) < self.window:
                raise DeployError(f"prefix has {len(head)} samples; give at least one window "
                                  f"({self.window})")
            starts = torch.argsort(torch.rand(n_streams, len(head), generator=gen), 1)
            streams = torch.cat([starts[:, : self.window], streams + len(head)], 1)
            data = torch.cat([head, data])
        with one_thread():
            paths = self._paths(data, streams)
        crossed = paths > self.threshold
        first = torch.where(crossed.any(1), crossed.float().argmax(1).double() + self.window,
                            torch.tensor(float("inf"), dtype=torch.float64))
        return first

    # -- the live stream -----------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the stream (after an alarm, to watch again)."""
        self._state = self._new_state()
        self.t = 0

    def update(self, batch: Any) -> list[dict[str, Any]]:
        """Add one sample (d,) or a batch (n, d); one event per sample: position ``t`` (samples
        seen since the last reset), ``statistic`` (None until the window is full), ``threshold``
        and ``drift``."""
        x = torch.as_tensor(batch).detach().cpu().to(torch.float64)
        x = x[None] if x.dim() == 1 else x.reshape(x.shape[0], -1)
        if x.shape[1] != self.width:
            raise DeployError(f"the stream has {x.shape[1]} features, the reference {self.width}; "
                              "compute both with the same model and layer")
        if not torch.isfinite(x).all():
            raise DeployError("the stream holds NaN or inf values; drop those samples before "
                              "monitoring")
        events = []
        with one_thread():
            return self._update_rows(x, events)

    def _update_rows(self, x: torch.Tensor, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for row in x:
            self.t += 1
            stat = self._step(self._state, row)
            events.append({"t": self.t, "statistic": stat, "threshold": self.threshold,
                           "drift": stat is not None and stat > self.threshold})
        return events

    def to_dict(self) -> dict[str, Any]:
        return {"detector": self.kind, "ert": self.ert, "window": self.window,
                "threshold": self.threshold, **self.calibration}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run a loop of many tiny tensor operations on one thread: with several, OpenMP's spinning
    threads cost far more than the work (30x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def mean_run_time(running_max: torch.Tensor, threshold: float, window: int) -> float:
    """Mean samples to the first crossing of ``threshold`` by paths whose running maxima are
    ``running_max`` (B, T'), streams without a crossing censored at T' (the exponential-tail
    estimate: total observed steps / number of crossings), plus the ``window - 1`` warm-up."""
    steps = running_max.shape[1]
    first = torch.searchsorted(running_max.contiguous(),
                               torch.full((len(running_max), 1), threshold,
                                          dtype=running_max.dtype), right=True)[:, 0]
    events = int((first < steps).sum())
    if events == 0:
        return float("inf")
    observed = float(torch.clamp(first + 1, max=steps).sum())
    return window - 1 + observed / events


class OnlineMMD(OnlineDetector):
    """Online MMD²: unbiased MMD² between the reference and the latest ``window`` samples, Gaussian
    kernel (median-heuristic bandwidth), updated per sample in O(window + reference) work.
    ``max_reference`` caps the samples the statistic compares with (seeded subsample)."""

    kind = "mmd"

    def __init__(self, reference: Any, *, ert: float, window: int, bandwidth: float | None = None,
                 max_reference: int = 10000, **kwargs: Any) -> None:
        self.bandwidth, self.max_reference = bandwidth, max_reference
        super().__init__(reference, ert=ert, window=window, **kwargs)

    def _prepare(self, reference: torch.Tensor) -> None:
        if len(reference) > self.max_reference:
            gen = torch.Generator().manual_seed(self.seed + 1)
            reference = reference[torch.randperm(len(reference), generator=gen)
                                  [: self.max_reference]]
        self.reference = reference
        self.sigma = self.bandwidth or median_bandwidth(reference, seed=self.seed)
        sub = reference[:2000]
        k = gauss(sub, sub, self.sigma)
        self.ref_term = float((k.sum() - k.diagonal().sum()) / (len(sub) * (len(sub) - 1)))

    def _h(self, x: torch.Tensor) -> torch.Tensor:
        """Mean kernel value of each row of ``x`` against the reference."""
        return gauss(x, self.reference, self.sigma, chunk=512).mean(1)

    def _paths(self, pool: torch.Tensor, streams: torch.Tensor, calibrate: bool = False
               ) -> torch.Tensor:
        w = self.window
        kp = gauss(pool, pool, self.sigma).float()  # (P, P)
        hp = self._h(pool)  # ⟨m_R, k(x, ·)⟩ for each pool sample
        const = self.ref_term  # ‖m_R‖²
        if calibrate:  # compare with a = s·m_R + (1-s)·m_P (see OnlineDetector._paths)
            n_p, n_r = len(pool), len(self.reference)
            s = (n_p / (n_r + n_p)) ** 0.5
            g = (kp.double().sum(1) - 1) / (n_p - 1)  # ⟨m_P, k(x, ·)⟩, leaving x itself out
            cross, own = float(hp.mean()), float(g.mean())  # ⟨m_R, m_P⟩, ‖m_P‖² (off-diagonal)
            const = s * s * const + 2 * s * (1 - s) * cross + (1 - s) ** 2 * own
            hp = s * hp + (1 - s) * g
        b, t = streams.shape
        first = streams[:, :w]
        pair = kp[first[:, :, None], first[:, None, :]].double().sum((1, 2)) - w  # off-diagonal
        sum_h = hp[first].sum(1)
        out = torch.empty(b, t - w + 1, dtype=torch.float64)
        norm = w * (w - 1)
        out[:, 0] = pair / norm - 2 * sum_h / w
        for j in range(w, t):
            old, new, mid = streams[:, j - w], streams[:, j], streams[:, j - w + 1 : j]
            pair += 2 * (kp[new[:, None], mid].double().sum(1)
                         - kp[old[:, None], mid].double().sum(1))
            sum_h += hp[new] - hp[old]
            out[:, j - w + 1] = pair / norm - 2 * sum_h / w
        return out + const

    def _new_state(self) -> dict[str, Any]:
        return {"x": [], "h": [], "k": torch.zeros(self.window, self.window, dtype=torch.float64)}

    def _step(self, state: dict[str, Any], x: torch.Tensor) -> float | None:
        w = self.window
        row = gauss(x[None], torch.stack(state["x"]), self.sigma)[0] if state["x"] else None
        state["x"].append(x)
        state["h"].append(float(self._h(x[None])[0]))
        k = state["k"]
        n = len(state["x"])
        if n > w:  # slide: drop the oldest row/column of the window's kernel matrix
            state["x"].pop(0)
            state["h"].pop(0)
            k[:-1, :-1] = k[1:, 1:].clone()
            row = row[1:]
            n = w
        if row is not None:
            k[n - 1, : n - 1] = row
            k[: n - 1, n - 1] = row
        if n < w:
            return None
        pair = float(k.sum() - k.diagonal().sum())
        return pair / (w * (w - 1)) - 2 * sum(state["h"]) / w + self.ref_term


class OnlineLSDD(OnlineDetector):
    """Online LSDD: least-squares density difference between the reference and the latest
    ``window`` samples, with ``n_centers`` Gaussian kernel centres drawn from the reference (default
    2·window, at most 200), features standardised by the reference. Each sample costs one kernel
    row against the centres: O(n_centers · d), whatever the reference size."""

    kind = "lsdd"

    def __init__(self, reference: Any, *, ert: float, window: int, n_centers: int | None = None,
                 lam: float = 1e-3, **kwargs: Any) -> None:
        self.n_centers, self.lam = n_centers, lam
        super().__init__(reference, ert=ert, window=window, **kwargs)

    def _prepare(self, reference: torch.Tensor) -> None:
        self.mean, self.std = standardiser(reference)
        z = (reference - self.mean) / self.std
        n_c = self.n_centers or min(2 * self.window, 200, len(z) // 2)
        if not 1 <= n_c <= len(z) - 2:
            raise DeployError(f"lsdd: n_centers={n_c} must lie in [1, {len(z) - 2}]")
        centers, rest = z[:n_c], z[n_c:]  # z is already in random order (the split permuted it)
        self.model = LSDDModel(centers, median_bandwidth(rest, centers, seed=self.seed), self.lam)
        self.ref_mean = self.model.kernel(rest).mean(0)
        self.n_reference = len(rest)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.kernel((x - self.mean) / self.std)

    def _paths(self, pool: torch.Tensor, streams: torch.Tensor, calibrate: bool = False
               ) -> torch.Tensor:
        w = self.window
        vp = self._embed(pool)  # (P, L)
        target = self.ref_mean
        if calibrate:  # compare with s·m_R + (1-s)·m_P (see OnlineDetector._paths)
            s = (len(pool) / (self.n_reference + len(pool))) ** 0.5
            target = s * self.ref_mean + (1 - s) * vp.mean(0)
        b, t = streams.shape
        total = vp[streams[:, :w]].sum(1)  # (B, L)
        out = torch.empty(b, t - w + 1, dtype=torch.float64)
        out[:, 0] = self.model.statistic(target - total / w)
        for j in range(w, t):
            total += vp[streams[:, j]] - vp[streams[:, j - w]]
            out[:, j - w + 1] = self.model.statistic(target - total / w)
        return out

    def _new_state(self) -> dict[str, Any]:
        return {"v": [], "total": torch.zeros(len(self.ref_mean), dtype=torch.float64)}

    def _step(self, state: dict[str, Any], x: torch.Tensor) -> float | None:
        v = self._embed(x[None])[0]
        state["v"].append(v)
        state["total"] += v
        if len(state["v"]) > self.window:
            state["total"] -= state["v"].pop(0)
        if len(state["v"]) < self.window:
            return None
        return float(self.model.statistic(self.ref_mean - state["total"] / self.window))


#: online detectors by name (``deltatune monitor --detector``)
ONLINE = {"mmd": OnlineMMD, "lsdd": OnlineLSDD}


def online_detector(name: str, reference: Any, **kwargs: Any) -> OnlineDetector:
    """An online detector by name (``mmd`` or ``lsdd``)."""
    if name not in ONLINE:
        raise DeployError(f"unknown online detector {name!r}; choose from {', '.join(ONLINE)}")
    return ONLINE[name](reference, **kwargs)
