"""Shift detection: ``detect(reference, target, test=...)`` in batch, ``DriftMonitor`` on a stream.

Inputs are features or model outputs (tensors or arrays, one row per sample), or raw inputs plus a
``model``: the features are then the input of ``layer`` (default the last ``nn.Linear``, i.e. the
penultimate representation) and the outputs are the model's softmax, computed in batches.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .batch import call_model, get_logits, iter_batches, last_linear, tap_input, to_tensor
from .errors import DeployError
from .stats import TESTS

# Which representation of the model each test reads when a model is given.
_USES_OUTPUTS = {"bbsd", "label"}


@dataclass(frozen=True)
class DetectionResult:
    """One two-sample test: ``drift`` is ``p_value < alpha``."""

    test: str
    statistic: float
    p_value: float
    drift: bool
    alpha: float
    n_reference: int
    n_target: int
    details: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self, *, details: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not details:
            out.pop("details")
        return out


def embed(
    model: nn.Module,
    data: Any,
    *,
    outputs: bool = False,
    layer: str | None = None,
    batch_size: int = 256,
    logits_fn: Any = None,
    softmax: bool = True,
) -> torch.Tensor:
    """Features (input of ``layer``, default the last ``nn.Linear``) or softmax outputs of ``model``
    (the raw logits with ``softmax=False``) over ``data`` (a tensor of inputs or an iterable of
    batches), as one (N, d) tensor."""
    was_training = model.training
    model.eval()
    rows: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for batch in iter_batches(data, batch_size):
                if outputs:
                    z = get_logits(call_model(model, batch), logits_fn).float()
                    rows.append((z.softmax(-1) if softmax else z).cpu())
                else:
                    with tap_input(model, layer or last_linear(model)) as seen:
                        call_model(model, batch)
                    rows.append(seen[-1].float().cpu())
    finally:
        model.train(was_training)
    if not rows:
        raise DeployError("the data yielded no batches; nothing to embed")
    return torch.cat(rows)


def as_samples(value: Any, name: str) -> torch.Tensor:
    """A float64 (n, d) tensor from a tensor/array of samples, with a clear error for bad input."""
    try:
        t = to_tensor(value).to(torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DeployError(
            f"{name} must be a tensor or array of samples (one row each): {exc}"
        ) from exc
    if t.dim() == 1:
        t = t[:, None]
    elif t.dim() > 2:
        t = t.reshape(t.shape[0], -1)
    if t.dim() != 2 or t.shape[0] < 2:
        n = t.shape[0] if t.dim() else 0
        raise DeployError(f"{name} has {n} samples; a two-sample test needs at least 2 per side")
    if not torch.isfinite(t).all():
        raise DeployError(f"{name} holds NaN or inf values; drop those samples before testing")
    return t


def detect(
    reference: Any,
    target: Any,
    test: str = "mmd",
    alpha: float = 0.05,
    *,
    model: nn.Module | None = None,
    layer: str | None = None,
    batch_size: int = 256,
    max_samples: int | None = 1000,
    seed: int = 0,
    **options: Any,
) -> DetectionResult:
    """Test whether ``target`` comes from the distribution of ``reference``.

    ``test``: ``mmd`` (kernel MMD, permutation test), ``ks`` (per-feature KS, ``correction`` =
    ``bonferroni`` or ``bh``), ``classifier`` (classifier two-sample test), ``bbsd`` (KS on softmax
    outputs), ``label`` (chi-squared on predicted labels), ``lsdd`` (least-squares density
    difference), ``cvm`` (per-feature Cramér-von Mises), ``mmd_rff`` (linear-time MMD on random
    Fourier features). ``options`` go to the test (e.g. ``n_permutations``). Samples beyond
    ``max_samples`` per side are subsampled (seeded) to bound the cost (``None``: keep all, for
    the linear-time ``mmd_rff``). Returns a :class:`DetectionResult` with ``p_value`` and
    ``drift``.
    """
    fn = _resolve_test(test, alpha, options)
    if "seed" in inspect.signature(fn).parameters:
        options.setdefault("seed", seed)
    if model is not None:
        outputs = test in _USES_OUTPUTS
        reference = embed(model, reference, outputs=outputs, layer=layer, batch_size=batch_size)
        target = embed(model, target, outputs=outputs, layer=layer, batch_size=batch_size)
    x, y = as_samples(reference, "reference"), as_samples(target, "target")
    if x.shape[1] != y.shape[1]:
        raise DeployError(
            f"reference has {x.shape[1]} features but target has {y.shape[1]}; compute both the "
            "same way"
        )
    gen = torch.Generator().manual_seed(seed)
    x, y = (
        v[torch.randperm(len(v), generator=gen)[:max_samples]]
        if max_samples is not None and len(v) > max_samples
        else v
        for v in (x, y)
    )
    stat, p, details = fn(x, y, **options)
    return DetectionResult(test, stat, p, p < alpha, alpha, len(x), len(y), details)


def _resolve_test(test: str, alpha: float, options: dict[str, Any]):
    """The test function, after checking its name, ``alpha`` and the option names."""
    fn = TESTS.get(test)
    if not 0 < alpha < 1:
        raise DeployError(f"alpha={alpha} must lie in (0, 1) (the significance level, e.g. 0.05)")
    accepted = [
        p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]
    bad = [k for k in options if k not in accepted]
    if bad:
        raise DeployError(
            f"test {test!r} has no option {bad[0]!r}; its options: {', '.join(accepted) or 'none'}"
        )
    return fn


class DriftMonitor:
    """Streaming shift detection: a sliding window of the latest ``window`` target samples is tested
    against the reference every ``stride`` new samples (default: ``window``, non-overlapping
    windows).

    ``update(batch)`` takes features/outputs (or inputs when ``model`` is given) and returns the
    results of the tests it ran (usually zero or one). Each window is one test at level ``alpha``:
    over many windows some false alarms are expected (about ``alpha`` of the clean windows).
    """

    def __init__(
        self,
        reference: Any,
        test: str = "mmd",
        alpha: float = 0.05,
        *,
        window: int = 200,
        stride: int | None = None,
        model: nn.Module | None = None,
        layer: str | None = None,
        **options: Any,
    ) -> None:
        if window < 2:
            raise DeployError(f"window={window} must be at least 2 samples")
        self.stride = stride if stride is not None else window
        if self.stride < 1:
            raise DeployError(f"stride={stride} must be at least 1 sample")
        self.seed = int(options.pop("seed", 0))
        own = {
            k: v for k, v in options.items() if k not in ("max_samples", "batch_size")
        }  # detect()'s own
        _resolve_test(test, alpha, own)
        self.test, self.alpha, self.window, self.options = test, alpha, window, options
        self.model, self.layer = model, layer
        self.reference = self._represent(reference)
        self._buffer: torch.Tensor | None = None
        self._pending = 0
        self.seen = 0
        self.history: list[dict[str, Any]] = []

    def _represent(self, data: Any) -> torch.Tensor:
        if self.model is not None:
            return embed(self.model, data, outputs=self.test in _USES_OUTPUTS, layer=self.layer)
        return as_samples(data, "batch")

    def update(self, batch: Any) -> list[DetectionResult]:
        new = self._represent(batch) if self.model is not None else _rows(batch)
        self._buffer = new if self._buffer is None else torch.cat([self._buffer, new])
        results = []
        for i in range(len(new)):
            self.seen += 1
            self._pending += 1
            if self.seen >= self.window and self._pending >= self.stride:
                end = len(self._buffer) - (len(new) - 1 - i)
                res = detect(
                    self.reference,
                    self._buffer[end - self.window : end],
                    self.test,
                    self.alpha,
                    seed=self.seed + self.seen,
                    **self.options,
                )
                self.history.append(
                    {
                        "position": self.seen,
                        "p_value": res.p_value,
                        "drift": res.drift,
                        "statistic": res.statistic,
                    }
                )
                results.append(res)
                self._pending = 0
        self._buffer = self._buffer[-self.window :]
        return results


def _rows(batch: Any) -> torch.Tensor:
    t = to_tensor(batch).to(torch.float64)
    t = t[:, None] if t.dim() == 1 else t.reshape(t.shape[0], -1)
    if not torch.isfinite(t).all():
        raise DeployError("the batch holds NaN or inf values; drop those samples before monitoring")
    return t
