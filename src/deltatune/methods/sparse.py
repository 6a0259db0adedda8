"""Sparse fine-tuning: train a fixed small subset of a layer's weights (diff pruning, FISH masks).

Unified view: function = a sparse weight change ``ΔW = scatter(values at indices)``; position = the
chosen layers' weights; insertion = on the weights (parallel form ``h + ΔW·x``). Foldable and
exactly additive. The trained entries are chosen once, before training:

- ``selection="magnitude"``: the largest ``|W|`` of each layer (``density`` of its entries);
- ``"random"``: a seeded random subset of each layer (diff pruning with a fixed random mask);
- ``"fish"``: the entries with the largest empirical Fisher information over *all* chosen layers,
  from a few batches of task data — :func:`fish_mask` then :func:`attach_masked`;
- ``"given"``: any boolean masks of your own, via :func:`attach_masked`.

Saved sparsely: ``indices`` (int64, flat positions in the weight) and ``values`` per layer.

Papers: FISH — Sung et al., "Training Neural Networks with Fixed Sparse Masks", NeurIPS 2021,
https://arxiv.org/abs/2111.09839 · diff pruning — Guo et al., "Parameter-Efficient Transfer Learning
with Diff Pruning", ACL 2021, https://arxiv.org/abs/2012.07463
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import Delta
from ..core.errors import DeltaFileError, SpecError, TargetError
from ..core.example import Example
from ..core.host import DeltaHost, Host, get_module, module_kind
from ..core.model import attach, detach
from ..core.spec import DeltaSpec, register
from ..core.targets import select_targets

_DATA_MASKS = ("fish", "given")
#: ``loss_fn(model, batch)`` → scalar loss of one batch
LossFn = Callable[[nn.Module, Any], torch.Tensor]


@register
@dataclass(frozen=True)
class SparseFT(DeltaSpec):
    """A sparse delta on the weights of Linear / GPT-2 Conv1D / Conv layers (and Embeddings when
    targeted). ``density``: fraction of each layer's entries that train (``magnitude``/``random``)
    or of all chosen entries (``fish``). ``counts`` is filled by :func:`attach_masked` (entries per
    layer)."""

    method = "sparse"
    example = Example(dict(density=0.2), bad=(
        ({"density": 0.0}, "density"), ({"density": 1.5}, "density"),
        ({"selection": "top"}, "selection"), ({"counts": {"fc1": 0}}, "counts"),
        ({"seed": -1}, "seed")))
    host_kinds = ("linear", "conv", "embedding")
    default_scope = "every"  # every Linear / Conv layer by default; Embeddings only when targeted

    def hosts_by_default(self, module: nn.Module) -> bool:
        return module_kind(module) in ("linear", "conv")

    def hosts_what(self, default: bool = False) -> str:
        return "Linear or Conv layer" if default else "Linear, Conv or Embedding layer"

    density: float = 0.01
    selection: Literal["magnitude", "random", "fish", "given"] = "magnitude"
    seed: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        if not (isinstance(self.density, (int, float)) and 0.0 < self.density <= 1.0):
            self.fail("density", "must be in (0, 1] (the fraction of weight entries that train)")
        if not isinstance(self.seed, int) or self.seed < 0:
            self.fail("seed", "must be a non-negative integer")
        for key, value in self.counts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                self.fail(
                    "counts", f"gives {key!r} {value!r} entries; counts must be positive integers"
                )

    def paths(self, model: nn.Module) -> list[str]:
        """The layers this spec puts a sparse delta on."""
        return select_targets(model, self)

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        if self.selection in _DATA_MASKS and module_name not in self.counts:
            raise TargetError(
                f"SparseFT(selection={self.selection!r}) takes its masks from data: build them "
                "with deltatune.methods.sparse.fish_mask(...) and attach with "
                "deltatune.methods.sparse.attach_masked(...)"
            )
        return SparseDelta(self, host, module_name)


class SparseDelta(Delta):
    """``h + ΔW·x`` with ``ΔW`` zero except at ``indices`` (flat positions in the base weight)."""

    foldable = True

    def __init__(self, spec: SparseFT, host: DeltaHost, path: str) -> None:
        super().__init__(spec)
        w = host.weight
        self.kind, self.fan_in_fan_out, self.shape = host.kind, host.fan_in_fan_out, tuple(w.shape)
        k = spec.counts.get(path) or max(1, round(spec.density * w.numel()))
        if k > w.numel():
            raise TargetError(
                f"SparseFT wants {k} entries of {path!r}, which has only {w.numel()}; "
                "lower the count"
            )
        if spec.selection == "magnitude":
            idx = w.detach().abs().flatten().topk(k).indices
        elif spec.selection == "random":  # a per-layer stream: the same layer gets the same mask
            gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + zlib.crc32(path.encode()))
            idx = torch.randperm(w.numel(), generator=gen)[:k]
        else:  # placeholder, set by attach_masked or loaded from a file
            idx = torch.arange(k)
        self.register_buffer("indices", idx.sort().values.to(device=w.device, dtype=torch.long))
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self.values = nn.Parameter(torch.zeros(k, dtype=dtype, device=w.device))

    def dense(self) -> torch.Tensor:
        """``ΔW`` in the base weight's layout."""
        flat = self.values.new_zeros(math.prod(self.shape))
        return flat.index_add(0, self.indices, self.values).view(self.shape)

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        dw = self.dense()
        if self.kind == "conv":
            return h + host.conv(x.to(dw.dtype), dw).to(h.dtype)
        if self.kind == "embedding":
            b = host.base
            out = F.embedding(x, dw, b.padding_idx, None, 2.0, b.scale_grad_by_freq, b.sparse)
            return h + out.to(h.dtype)
        return h + F.linear(x.to(dw.dtype), dw.t() if self.fan_in_fan_out else dw).to(h.dtype)

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        return {"weight": self.dense().detach()}

    def set_mask(self, mask: torch.Tensor) -> None:
        idx = mask.flatten().nonzero().squeeze(1)
        if idx.numel() != self.indices.numel():
            raise SpecError(
                f"mask has {idx.numel()} entries but this delta holds {self.indices.numel()}"
            )
        self.indices.copy_(idx)

    def after_load(self, host: DeltaHost) -> None:
        idx = self.indices
        in_range = (
            int(idx.min()) >= 0 and int(idx.max()) < math.prod(self.shape) if idx.numel() else True
        )
        if not in_range or bool((idx[1:] <= idx[:-1]).any()):
            raise DeltaFileError("SparseFT indices are out of range or not strictly increasing; "
                                 "the delta file is corrupt")


def attach_masked(
    model: nn.Module,
    spec: SparseFT,
    masks: dict[str, torch.Tensor],
    name: str = "default",
    *,
    activate: bool = True,
) -> list[str]:
    """Attach ``spec`` with the given boolean masks (by module path, each of the weight's shape).

    The spec is narrowed to exactly those modules and records each one's entry count, so the saved
    delta reloads with plain ``dt.load_adapter``. Nothing changes when an error is raised.
    """
    if not masks:
        raise SpecError(
            "attach_masked() needs at least one mask; fish_mask() returns them by module path"
        )
    counts, total = {}, 0
    for path, mask in masks.items():
        try:
            module = get_module(model, path)
        except AttributeError:
            raise TargetError(f"mask for {path!r}: the model has no such module; "
                              "use the paths fish_mask() returned") from None
        weight = (module.base if isinstance(module, Host) else module).weight
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(weight.shape):
            raise SpecError(
                f"mask for {path!r} must be a bool tensor of shape {tuple(weight.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        if not mask.any():
            raise SpecError(f"mask for {path!r} selects no entry; leave the module out instead")
        counts[path] = int(mask.sum())
        total += mask.numel()
    selection = spec.selection if spec.selection in _DATA_MASKS else "given"
    density = sum(counts.values()) / total  # recorded for information: the counts decide
    spec = spec.replace(
        targets=tuple(sorted(counts)),
        target_regex=None,
        target_types=(),
        counts=counts,
        selection=selection,
        density=density,
    )
    paths = attach(model, spec, name, activate=activate)
    try:
        for path in paths:
            host = get_module(model, path)
            host.deltas[name].set_mask(masks[path].to(device=host.weight.device))
    except Exception:
        detach(model, name)
        raise
    return paths


def fisher_scores(
    model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, paths: list[str]
) -> dict[str, torch.Tensor]:
    """Empirical Fisher of the weights at ``paths``: the sum over batches of the squared gradient of
    ``loss_fn(model, batch)``. Batches of one sample give the per-example Fisher of the FISH
    paper."""
    weights = {p: get_module(model, p).weight for p in paths}
    saved = {id(p): p.requires_grad for p in model.parameters()}
    scores = {p: torch.zeros_like(w, dtype=torch.float32) for p, w in weights.items()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        seen = 0
        with torch.enable_grad():
            for batch in batches:
                for w in weights.values():
                    w.grad = None
                loss = loss_fn(model, batch)
                if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
                    raise SpecError("loss_fn(model, batch) must return a scalar loss tensor")
                loss.backward()
                for p, w in weights.items():
                    if w.grad is not None:
                        scores[p] += w.grad.detach().float() ** 2
                seen += 1
        if not seen:
            raise SpecError("fish_mask() got no batches; pass a few batches of task data")
    finally:
        for w in weights.values():
            w.grad = None
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
    return scores


def fish_mask(
    model: nn.Module,
    batches: Iterable[Any],
    density: float,
    loss_fn: LossFn,
    spec: SparseFT | None = None,
) -> dict[str, torch.Tensor]:
    """FISH masks: the ``density`` fraction of all chosen weight entries (``spec``'s layers, by
    default every Linear/Conv) with the largest empirical Fisher information, chosen globally across
    layers.

    ``loss_fn(model, batch)`` returns the task loss of one batch. Use the result with
    :func:`attach_masked`: ``attach_masked(model, SparseFT(selection="fish"), masks, name=...)``.
    """
    spec = (spec or SparseFT(selection="fish")).replace(
        density=density, counts={}
    )  # validates density
    scores = fisher_scores(model, batches, loss_fn, spec.paths(model))
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = max(1, round(density * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[flat.topk(k).indices] = True
    masks, start = {}, 0
    for path, s in scores.items():
        part = keep[start : start + s.numel()].view(s.shape)
        start += s.numel()
        if part.any():
            masks[path] = part.to(s.device)
    return masks
