"""Reading a model's features: the input of its classifier head, cached per example.

Prototype strategies (SimpleCIL, APER, RanPAC, EASE) and the prompt pools' queries classify the
vector the head receives. A frozen view of the model gives every example the same vector each time
it is seen, so the vectors are cached by the bytes of the example's input tensors: evaluating every
task after every task then runs the backbone once per test example and view, not once per row of
the accuracy matrix.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..core.host import get_module
from .streams import ContinualError


def _inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


def row_keys(batch: dict[str, Any]) -> list[bytes]:
    """One digest per sample of the batch's input tensors (labels left out)."""
    tensors = [v for k, v in sorted(_inputs(batch).items()) if torch.is_tensor(v)]
    if not tensors:
        raise ContinualError("a batch holds no input tensors; the collate must return tensors")
    n = tensors[0].shape[0]
    keys = []
    for i in range(n):
        h = hashlib.blake2b(digest_size=16)
        for t in tensors:
            h.update(t[i].detach().cpu().contiguous().numpy().tobytes())
        keys.append(h.digest())
    return keys


class FeatureReader:
    """The features entering the model's classifier head, read by a forward pre-hook on it.

    ``views``: per view name (``"base"``, ``"task0"``, ...) a dict of cached vectors; a view's
    cache is valid while that view's weights stay fixed (``clear(view)`` otherwise)."""

    def __init__(self, model: nn.Module, head: list[str], who: str) -> None:
        if not head:
            raise ContinualError(
                f"strategy {who!r} classifies the features entering the model's classifier head, "
                "but no head module was named; pass head=['classifier'] (the model entry's head) "
                "or use a model with a linear head"
            )
        try:
            self.module = get_module(model, head[-1])
        except AttributeError:
            raise ContinualError(
                f"the model has no head module {head[-1]!r} for strategy {who!r} to read features "
                "from; pass the classifier's name"
            ) from None
        self.model, self.who = model, who
        self._seen: torch.Tensor | None = None
        self.cache: dict[str, dict[bytes, torch.Tensor]] = {}
        self._hook = self.module.register_forward_pre_hook(self._grab)

    def _grab(self, module: nn.Module, args: tuple) -> None:
        self._seen = args[0] if args else None

    def __call__(self, batch: dict[str, Any], grad: bool = False) -> torch.Tensor:
        """``(B, D)`` features of ``batch`` under the model's current delta state."""
        self._seen = None
        with torch.set_grad_enabled(grad):
            self.model(**_inputs(batch))
        f = self._seen
        self._seen = None
        if f is None or f.dim() != 2:
            raise ContinualError(
                f"strategy {self.who!r} reads a (batch, features) input of the head module, but "
                f"{type(self.module).__name__} got "
                f"{'nothing' if f is None else tuple(f.shape)}; name a linear head that takes "
                "pooled features"
            )
        return f.float()

    def cached(self, view: str, batch: dict[str, Any], compute: Callable[[], torch.Tensor]
               ) -> torch.Tensor:
        """Features of ``batch`` in ``view``: cached rows, and ``compute()`` for a batch with any
        row not cached yet (the whole batch: one forward)."""
        store = self.cache.setdefault(view, {})
        keys = row_keys(batch)
        if all(k in store for k in keys):
            return torch.stack([store[k] for k in keys])
        f = compute().detach()
        for k, row in zip(keys, f):
            store[k] = row.cpu()
        return f

    def clear(self, view: str | None = None) -> None:
        if view is None:
            self.cache.clear()
        else:
            self.cache.pop(view, None)

    def remove(self) -> None:
        self._hook.remove()


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, its mode restored after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def batches(examples: list, collate: Callable, size: int = 64) -> Iterator[dict[str, Any]]:
    for i in range(0, len(examples), size):
        yield collate(examples[i:i + size])
