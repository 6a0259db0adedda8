"""What the deployment tools need from a model call: batch checks, logits, features, entropy.

Wrappers keep the wrapped model's call signature, so they see ``*args, **kwargs``; these helpers
find the batch in them (the first tensor) and the logits in whatever the model returns (a tensor, a
tuple whose first item is the logits, or an object/dict with ``logits`` such as a transformers
output).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .errors import BatchError, DeployError

LogitsFn = Callable[[Any], torch.Tensor]


def to_tensor(value: Any) -> torch.Tensor:
    """A detached CPU tensor from a tensor, numpy array or nested list."""
    import numpy as np

    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    return t.detach().cpu()


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def check_batch(args: tuple, kwargs: dict, who: str) -> int:
    """Batch size of a model call; empty batches and NaN/inf inputs are refused before any
    update."""
    x = first_tensor(args, kwargs)
    if x is None:
        raise BatchError(
            f"{who}: the model call has no tensor argument to adapt on; pass the batch as a tensor"
        )
    if x.dim() == 0 or x.shape[0] == 0:
        raise BatchError(
            f"{who}: empty batch (shape {tuple(x.shape)}); skip empty batches before calling the "
            "wrapper"
        )
    for value in (*args, *kwargs.values()):
        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and not torch.isfinite(value).all()
        ):
            n = value.shape[0] if value.dim() else 1
            bad = (~torch.isfinite(value)).reshape(n, -1).any(1).sum().item()
            raise BatchError(
                f"{who}: the input holds NaN or inf values ({bad} of {n} samples); "
                "drop or repair those samples first (adapting on them would corrupt the model)"
            )
    return int(x.shape[0])


def get_logits(output: Any, logits_fn: LogitsFn | None = None) -> torch.Tensor:
    """The logits in a model output: a tensor, ``output.logits``, ``output["logits"]`` or
    ``output[0]``."""
    if logits_fn is not None:
        logits = logits_fn(output)
    elif isinstance(output, torch.Tensor):
        logits = output
    elif isinstance(output, dict) and "logits" in output:
        logits = output["logits"]
    elif hasattr(output, "logits"):
        logits = output.logits
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    else:
        raise DeployError(
            f"cannot find logits in a model output of type {type(output).__name__}; pass "
            "logits_fn=lambda out: ..."
        )
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
        raise DeployError(
            "the model's logits must be a tensor of shape (batch, classes); check logits_fn"
        )
    return logits


def with_logits(output: Any, logits: torch.Tensor) -> Any:
    """``output`` with its logits replaced (same type), for methods that only adjust predictions."""
    if isinstance(output, torch.Tensor):
        return logits
    if isinstance(output, tuple):
        return (logits, *output[1:])
    if isinstance(output, list):
        return [logits, *output[1:]]
    new = copy.copy(output)
    if isinstance(
        new, dict
    ):  # transformers ModelOutput is a dict whose items mirror its attributes
        new["logits"] = logits
    if hasattr(new, "logits"):
        setattr(new, "logits", logits)
    return new


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits) over the last dimension, one value per sample."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def call_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on one item of a data iterable.

    A tensor is the input; a dict is keyword arguments (``label``/``labels`` dropped); a tuple or
    list is ``(inputs, labels, ...)`` as a ``DataLoader`` yields it, so only its first item is
    passed.
    """
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k not in ("label", "labels")})
    if isinstance(batch, (tuple, list)) and batch:
        return call_model(model, batch[0])
    raise DeployError(
        f"cannot call the model on a batch of type {type(batch).__name__}; yield tensors, dicts or "
        "(x, y)"
    )


def iter_batches(data: Any, batch_size: int) -> Iterator[Any]:
    """A tensor is cut into batches along dim 0; any other iterable is taken as already batched."""
    if isinstance(data, torch.Tensor):
        for i in range(0, data.shape[0], batch_size):
            yield data[i : i + batch_size]
    elif isinstance(data, Iterable):
        yield from data
    else:
        raise DeployError(
            f"data must be a tensor or an iterable of batches, not {type(data).__name__}"
        )


def last_linear(model: nn.Module) -> str:
    """Name of the last ``nn.Linear`` in module order: the classifier head of most models.

    Linear layers inside attached deltas (``<host>.deltas.<name>...``) are not heads and are
    skipped.
    """
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".deltas." not in f".{n}."
    ]
    if not names:
        raise DeployError(
            "the model has no nn.Linear head to take features from; pass layer='module.name'"
        )
    return names[-1]


@contextlib.contextmanager
def tap_input(model: nn.Module, layer: str) -> Iterator[list[torch.Tensor]]:
    """Collect the first input of module ``layer`` on every forward inside the block (features)."""
    modules = dict(model.named_modules())
    if layer not in modules:
        import difflib

        close = difflib.get_close_matches(layer, list(modules), n=3)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise DeployError(f"layer {layer!r} is not a module of the model{hint}")
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, inputs: tuple, _output: Any) -> None:
        seen.append(inputs[0].reshape(inputs[0].shape[0], -1))  # (batch, features), flattened

    handle = modules[layer].register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()
