"""Test-time adaptation judged on a stream: the adapted model's running error (or, without labels,
its prediction entropy) batch by batch, beside the unadapted source model's.

    tta = dd.adapt(model, "tent", lr=1e-3)
    curves = dd.evaluate_stream(tta, loader)          # loader: a DataLoader, streamed in order
    curves["adapted"][-1], curves["source"][-1]       # final running error (%) of each
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from .base import TTAWrapper
from .batch import call_model, get_logits, softmax_entropy

#: wraps one pass over the batches, e.g. in a progress bar: ``progress(batches, "adapted")``
Progress = Callable[[Iterable[Any], str], Iterable[Any]]


def batch_labels(batch: Any) -> Any:
    """The labels a batch carries (a dict's ``labels``/``label``, a tuple's 2nd item), or None."""
    if isinstance(batch, dict):
        return batch.get("labels", batch.get("label"))
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    return None


def evaluate_stream(wrapper: TTAWrapper, batches: Iterable[Any], *, compare: bool = True,
                    progress: Progress | None = None) -> dict[str, list[float]]:
    """Stream ``batches`` through ``wrapper`` (adapting as it goes), then, with ``compare``, through
    the unadapted model.

    For each pass ``name`` ("adapted", "source") the result holds ``name``: the running error in %
    after each batch (empty when the batches carry no labels), and ``name + "_entropy"``: each
    batch's mean prediction entropy. The wrapper is taken off after its pass (source weights back),
    also on error, so the source pass sees the untouched model; with ``compare`` the batches are
    iterated twice (a DataLoader, not a generator).
    """
    model = wrapper.model
    curves: dict[str, list[float]] = {}
    try:
        _one_pass(wrapper, batches, "adapted", curves, progress)
    finally:
        wrapper.remove(reset=True)
    if compare:
        with torch.no_grad():
            _one_pass(model, batches, "source", curves, progress)
    return curves


def _one_pass(fn: Any, batches: Iterable[Any], name: str, curves: dict[str, list[float]],
              progress: Progress | None) -> None:
    wrong, seen, curve, entropy = 0, 0, [], []
    for batch in progress(batches, name) if progress is not None else batches:
        logits = get_logits(call_model(fn, batch)).detach()
        entropy.append(float(softmax_entropy(logits.float()).mean()))
        labels = batch_labels(batch)
        if labels is not None:
            wrong += int((logits.argmax(-1) != labels.to(logits.device)).sum())
            seen += len(labels)
            curve.append(100.0 * wrong / seen)
    curves[name], curves[f"{name}_entropy"] = curve, entropy
