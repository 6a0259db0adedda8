"""Views of a model call for test-time methods: augmented copies of a batch, its samples one by one
and batches rebuilt from stored samples.

Wrappers see a model call as ``(args, kwargs)``. A *view* is ``view(args, kwargs, generator) ->
(args, kwargs)``: the same call on changed inputs. The defaults know two input kinds, image batches
(a 4-D float tensor) and token batches (``input_ids`` with an ``attention_mask``); for anything else
a method that needs a view asks for one by name in its error message.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .batch import first_tensor

Call = tuple[tuple, dict]
View = Callable[[tuple, dict, torch.Generator], Call]


def _replace_first(args: tuple, kwargs: dict, new: torch.Tensor) -> Call:
    """The call with its first tensor (the batch) replaced by ``new``."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return (*args[:i], new, *args[i + 1 :]), kwargs
    key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return args, {**kwargs, key: new}


def is_image(args: tuple, kwargs: dict) -> bool:
    x = first_tensor(args, kwargs)
    return x is not None and x.dim() == 4 and x.is_floating_point()


def is_tokens(args: tuple, kwargs: dict) -> bool:
    ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    return isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor) and ids.dim() == 2


def _real_positions(mask: torch.Tensor) -> torch.Tensor:
    """Attended positions except each row's first and last one (``[CLS]``/``[SEP]``), (N, L)."""
    keep = mask.bool().clone()
    length = mask.long().sum(1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    keep[:, 0] = False
    keep[rows, (length - 1).clamp_min(0)] = False
    return keep


def weak_view(args: tuple, kwargs: dict, generator: torch.Generator) -> Call | None:
    """A label-preserving augmentation: CoTTA's light image augmentation, or 10% of a text's tokens
    hidden from attention (word dropout). ``None`` for other inputs."""
    if is_image(args, kwargs):
        from .cotta import image_augment

        return _replace_first(args, kwargs, image_augment(first_tensor(args, kwargs), generator))
    if is_tokens(args, kwargs):
        mask = kwargs["attention_mask"]
        drop = torch.rand(mask.shape, generator=generator).to(mask.device) < 0.1
        new = mask.masked_fill(drop & _real_positions(mask), 0)
        return args, {**kwargs, "attention_mask": new}
    return None


def destroy_view(args: tuple, kwargs: dict, generator: torch.Generator) -> Call | None:
    """An augmentation that destroys shape but keeps local content (DeYO's object-destructive view):
    images cut into a 4x4 grid of patches shuffled per sample; texts with their words shuffled
    (the first and last token kept). ``None`` for other inputs."""
    if is_image(args, kwargs):
        x = first_tensor(args, kwargs)
        n, c, h, w = x.shape
        ph, pw = h // 4, w // 4
        if ph == 0 or pw == 0:
            return None
        core = x[:, :, : 4 * ph, : 4 * pw]
        patches = (
            core.reshape(n, c, 4, ph, 4, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, 16, c, ph, pw)
        )
        order = torch.stack([torch.randperm(16, generator=generator) for _ in range(n)])
        patches = patches[torch.arange(n)[:, None], order.to(x.device)]  # (N, 16, C, ph, pw)
        grid = (
            patches.reshape(n, 4, 4, c, ph, pw)
            .permute(0, 3, 1, 4, 2, 5)
            .reshape(n, c, 4 * ph, 4 * pw)
        )
        out = x.clone()
        out[:, :, : 4 * ph, : 4 * pw] = grid
        return _replace_first(args, kwargs, out)
    if is_tokens(args, kwargs):
        ids = kwargs["input_ids"].clone()
        real = _real_positions(kwargs["attention_mask"])
        for i in range(ids.shape[0]):
            pos = real[i].nonzero().squeeze(-1)
            if pos.numel() > 1:
                ids[i, pos] = ids[i, pos[torch.randperm(pos.numel(), generator=generator)]]
        return args, {**kwargs, "input_ids": ids}
    return None


def split_call(args: tuple, kwargs: dict, n: int) -> list[Call]:
    """The call cut into ``n`` one-sample calls (tensors whose first dimension is ``n`` are sliced,
    everything else is shared)."""

    def part(v: object, i: int) -> object:
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n:
            return v[i : i + 1].detach()
        return v

    return [
        (tuple(part(a, i) for a in args), {k: part(v, i) for k, v in kwargs.items()})
        for i in range(n)
    ]


def stack_calls(calls: list[Call]) -> Call:
    """One call from one-sample calls; tensors of different lengths (token batches padded to their
    own batch's longest text) are right-padded with zeros, i.e. padding tokens and mask 0."""

    def join(values: list) -> object:
        if not isinstance(values[0], torch.Tensor) or values[0].dim() == 0:
            return values[0]
        dims = values[0].dim()
        size = [max(v.shape[d] for v in values) for d in range(1, dims)]
        padded = []
        for v in values:
            pad: list[int] = []
            for d in range(dims - 1, 0, -1):
                pad += [0, size[d - 1] - v.shape[d]]
            padded.append(F.pad(v, pad) if any(pad) else v)
        return torch.cat(padded)

    args = tuple(join([c[0][i] for c in calls]) for i in range(len(calls[0][0])))
    kwargs = {k: join([c[1][k] for c in calls]) for k in calls[0][1]}
    return args, kwargs
