"""Narrow training hooks that *return* values (continual-learning strategies plug in here).

Nothing is shared behind the trainer's back (avalanche's ``strategy.loss`` is the anti-pattern):
a callback returns a penalty to add to the loss, an extra batch to train on, or extra metrics to
record, and the trainer decides what to do with them. Every hook is optional: implement any
subset, or subclass :class:`BaseCallback` for no-op defaults.

Order per optimizer step, for each micro-batch: forward on the batch → ``penalty`` added to its loss
→ backward; then ``extra_batch`` (if not None) → its own forward/backward, its loss weighted by its
share of the examples. After the optimizer step: ``on_step_end``. After each evaluation at an epoch
end: ``on_epoch_end`` (its returned dict is stored with that epoch's metrics). When ``fit`` returns
or raises: ``on_train_end`` (e.g. undo what ``on_train_start`` changed). After every optimizer step
and every evaluation: ``on_log`` with their numbers (for trackers; it returns nothing).
``keeps_best`` vetoes an evaluated state as the best one to restore (``TrainConfig.keep_best``): an
evaluation is a candidate only when no callback returns False for its step.

A method can need callbacks to train as designed (AdaLoRA prunes ranks, IncreLoRA grows them): its
spec says so in ``DeltaSpec.training_callbacks``, and ``fit(..., spec_callbacks=True)`` (what
``deltatune train`` uses) adds them for every active delta through :func:`callbacks_from_specs`.

The ``model`` given to hooks is the user's module (never the DDP wrapper), on the training device.
Callback state is not part of trainer checkpoints: on ``resume`` ``on_train_start`` is called again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Callback(Protocol):
    def on_train_start(self, model: nn.Module) -> None:
        """Once before the first step (and again when a run resumes): e.g. snapshot anchor
        weights."""

    def penalty(
        self, model: nn.Module, batch: Mapping[str, Any], outputs: torch.Tensor
    ) -> torch.Tensor | None:
        """A scalar added to each micro-batch's loss (EWC/SI/MAS anchors, distillation), or None.

        ``outputs`` are the logits of ``batch`` (labels included in ``batch``); for a causal LM
        trained through the chunked loss, its last hidden states (B, T, H): the whole batch's
        logits are never built."""

    def extra_batch(self) -> dict[str, Any] | None:
        """A collated batch to train on beside each micro-batch (replay), or None."""

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """After optimizer step ``step`` (1-based)."""

    def on_epoch_end(
        self, model: nn.Module, epoch: int, metrics: dict[str, float]
    ) -> dict[str, float] | None:
        """After epoch ``epoch`` (1-based) with its evaluation ``metrics``; may return extra
        metrics."""

    def on_train_end(self, model: nn.Module) -> None:
        """Once when ``fit`` returns or raises."""

    def on_log(self, values: dict[str, float], step: int) -> None:
        """The numbers of each optimizer step (``train/loss``, ``train/lr``, ``train/grad_norm``,
        ...) and of each evaluation (``eval/accuracy``, ``eval/loss``, ...) at optimizer step
        ``step``: what experiment trackers record (:mod:`deltatune.train.trackers`)."""

    def keeps_best(self, model: nn.Module, step: int) -> bool:
        """Whether the state evaluated after optimizer step ``step`` may become the best state
        (what ``TrainConfig.keep_best`` restores at the end). False for a state the callback has
        changed since in a way a restore must not undo: AdaLoRA's triplets pruned at its final
        allocation would be live again in a state saved before it, beyond its rank budget."""


class BaseCallback:
    """No-op defaults for every hook: subclass and override the ones you need."""

    def on_train_start(self, model: nn.Module) -> None:
        return None

    def penalty(
        self, model: nn.Module, batch: Mapping[str, Any], outputs: torch.Tensor
    ) -> torch.Tensor | None:
        return None

    def extra_batch(self) -> dict[str, Any] | None:
        return None

    def on_step_end(self, model: nn.Module, step: int) -> None:
        return None

    def on_epoch_end(
        self, model: nn.Module, epoch: int, metrics: dict[str, float]
    ) -> dict[str, float] | None:
        return None

    def on_train_end(self, model: nn.Module) -> None:
        return None

    def on_log(self, values: dict[str, float], step: int) -> None:
        return None

    def keeps_best(self, model: nn.Module, step: int) -> bool:
        return True


def call(callbacks, hook: str, *args: Any) -> list[Any]:
    """Call ``hook`` on every callback that has it; the non-None results, in callback order."""
    results = []
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            value = fn(*args)
            if value is not None:
                results.append(value)
    return results


def callbacks_from_specs(
    model: nn.Module, total_steps: int, given: Sequence[Any] = ()
) -> list[Any]:
    """The callbacks the specs of ``model``'s active deltas ask for
    (``DeltaSpec.training_callbacks``) in a run of ``total_steps`` optimizer steps, leaving out any
    a ``given`` callback already provides (one of the same class for the same delta ``name``), so
    nothing runs twice."""
    from ..core.model import active, get_spec

    found = []
    for name in active(model):
        for cb in get_spec(model, name).training_callbacks(name, total_steps):
            if not any(type(g) is type(cb) and getattr(g, "name", None) == name for g in given):
                found.append(cb)
    return found
