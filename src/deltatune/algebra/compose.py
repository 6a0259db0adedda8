"""Combining adapters on a live model: weighted sums without merging, merging adapters into one
LoRA, and hot-swapping an adapter's weights without reloading the base.

The weighted sum scales each delta's contribution, ``h + w·(delta(x, h) − h)``, through forward
hooks on the delta modules (the engine is not changed); a trainable module copy (e.g. a head)
contributes ``w·(copy(x) − base(x))``. Hooks act on ordinary forwards; merged weights and per-sample
routing are refused or ignore them, as stated where they apply.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..core.errors import StateError
from ..core.host import DeltaHost, ModuleCopy, iter_hosts
from ..core.model import active, attach, delta_names, detach, get_spec, merge, set_active, unmerge
from .errors import MergeError
from .lowrank import LowRank
from .task_vector import TaskVector, merge_task_vectors


class WeightedSum:
    """Adapters ``weights`` active together, each contribution scaled by its weight (no merging).

    Use as a context manager or call :meth:`remove`; the previous active set comes back after.
    """

    def __init__(self, model: nn.Module, weights: Mapping[str, float]) -> None:
        known = set(delta_names(model))
        for name in weights:
            if name not in known:
                raise StateError(
                    f"no delta named {name!r} is attached; attached: "
                    f"{', '.join(sorted(known)) or 'none'}"
                )
        if any(h.merged for _, h in iter_hosts(model)):
            raise StateError("a weighted sum needs unmerged deltas; call dt.unmerge(model) first")
        self.model, self.weights = model, dict(weights)
        self._previous = active(model)
        self._handles: list[Any] = []
        set_active(model, list(self.weights))
        for _, host in iter_hosts(model):
            if isinstance(host, DeltaHost):
                for name, w in self.weights.items():
                    if name in host.deltas and w != 1.0:
                        self._handles.append(
                            host.deltas[name].register_forward_hook(_scale_contribution(w))
                        )
            elif isinstance(host, ModuleCopy):
                names = [n for n in self.weights if n in host.copies]
                if names:
                    self._handles.append(
                        host.register_forward_hook(
                            _mix_copies(host, {n: self.weights[n] for n in names})
                        )
                    )

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        set_active(self.model, self._previous)

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.remove()


def weighted(model: nn.Module, weights: Mapping[str, float]) -> WeightedSum:
    """``with weighted(model, {"news": 0.7, "tweets": 0.3}): model(x)`` — a weighted sum of
    adapters."""
    return WeightedSum(model, weights)


def _scale_contribution(w: float):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        h = args[1]
        return h + w * (output - h)
    return hook


def _mix_copies(host: ModuleCopy, weights: Mapping[str, float]):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if host.disabled or host._route is not None:
            return output
        base = host.base(*args)
        return base + sum(w * (host.copies[n](*args) - base) for n, w in weights.items())
    return hook


# -- factored vectors as LoRA adapters ---------------------------------------------------------
def attach_lowrank(
    model: nn.Module, vector: TaskVector, name: str, *, activate: bool = True
) -> list[str]:
    """Attach a factored task vector (``LowRank`` weight entries) as a LoRA delta named ``name``.

    Each module gets the rank of its entry (``rank_pattern``) and scaling 1. Returns the host paths.
    """
    from ..methods.lora import LoRA

    paths, ranks = [], {}
    for key, entry in vector.items():
        path, _, pname = key.rpartition(".")
        if pname != "weight" or not isinstance(entry, LowRank):
            raise MergeError(
                f"entry {key} is not a factored weight change; call vector.to_rank(r) first (LoRA "
                "holds weight changes only)"
            )
        paths.append(path)
        ranks[path] = entry.rank
    top = max(ranks.values())
    spec = LoRA(r=top, alpha=float(top), targets=tuple(paths), rank_pattern=dict(ranks),
                alpha_pattern={p: float(r) for p, r in ranks.items()})
    hosts = attach(model, spec, name, activate=activate)
    try:
        by_path = dict(iter_hosts(model))
        with torch.no_grad():
            for key, entry in vector.items():
                path = key.rpartition(".")[0]
                host = by_path[path]
                delta = host.part(name)
                want = host.kind == "embedding" or bool(host.fan_in_fan_out)
                if entry.transposed != want:
                    raise MergeError(
                        f"entry {key} is stored "
                        f"{'transposed' if entry.transposed else 'untransposed'}, which does not "
                        f"fit {type(host.base).__name__}"
                    )
                delta.lora_A.copy_(entry.A.to(delta.lora_A.dtype))
                delta.lora_B.copy_((entry.B * entry.scale).to(delta.lora_B.dtype))
    except Exception:
        detach(model, name)
        raise
    return hosts


def merge_adapters(
    model: nn.Module,
    names: Sequence[str],
    method: str = "lora_concat",
    *,
    weights: Sequence[float] | None = None,
    name: str = "merged",
    rank: int | None = None,
    activate: bool = True,
    **params: Any,
) -> TaskVector:
    """Merge attached adapters into one new LoRA named ``name`` and return its task vector.

    ``lora_concat`` is exact (rank = Σ ranks); ``lora_svd`` re-factors to ``rank``; any registered
    dense method (``ties``, ``dare_ties``, ...) merges the ΔW's and needs ``rank`` to store the
    result as a LoRA. Trainable module copies (heads) are not merged: keep one per task.
    """
    if not names:
        raise MergeError("merge_adapters needs the names of at least one attached adapter")
    factored = method in ("lora_concat", "lora_svd")
    if not factored and rank is None:
        raise MergeError(
            f"{method} merges dense weight changes; pass rank=... to store them as a LoRA, or use "
            "merge_task_vectors(...).apply_to(model)"
        )
    vectors = [TaskVector.from_adapter(model, n, factored=factored, copies=False) for n in names]
    if weights is not None:
        params["weight"] = list(weights)
    merged = merge_task_vectors(vectors, method, rank=rank, **params)
    attach_lowrank(model, merged, name, activate=activate)
    return merged


# -- hot swap -------------------------------------------------------------------------------------
def hot_swap(model: nn.Module, name: str, path: str | os.PathLike) -> None:
    """Replace attached delta ``name``'s tensors in place with those saved at ``path``.

    The base model is not reloaded and no module is replaced (compiled graphs and optimizers holding
    the parameters stay valid). The saved delta must have the same spec (method, rank, targets...);
    merged deltas are unmerged for the swap and merged again. Nothing changes on error.

    The saved delta (either format, checked as ``dt.load_adapter`` checks it) is loaded beside
    ``name`` for the swap and detached after: io is used through its public loader only.
    """
    from ..io import load_adapter

    if name not in delta_names(model):
        raise StateError(
            f"no delta named {name!r} is attached; attach it once, then hot-swap its weights"
        )
    current = get_spec(model, name).to_dict()
    parts = _parts(model, name)
    tmp = "_hotswap_tmp"
    load_adapter(model, path, name=tmp, activate=False)
    try:
        _same_spec(current, get_spec(model, tmp).to_dict(), path)
        new = _parts(model, tmp)
        if sorted(new) != sorted(parts):
            raise MergeError(
                f"{path} changes other modules than delta {name!r}; attach it as a new delta "
                "instead"
            )
        with _unmerged(model), torch.no_grad():
            for p, module in parts.items():
                module.load_state_dict(new[p].state_dict())
            for p, host in iter_hosts(model):
                if p in parts and not isinstance(host, ModuleCopy):
                    parts[p].after_load(host)  # re-derive what is computed from the tensors
    finally:
        detach(model, tmp)


def _parts(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """Delta ``name``'s part in every host holding it (deltas and trainable copies), by path."""
    return {p: h.part(name) for p, h in iter_hosts(model) if name in h.delta_names()}


def _same_spec(current: Mapping[str, Any], saved: Mapping[str, Any], path: Any) -> None:
    for key in sorted(set(current) | set(saved)):
        if current.get(key) != saved.get(key):
            raise MergeError(
                f"{path} has {key}={saved.get(key)!r} but the attached delta has "
                f"{current.get(key)!r}; hot swap needs the same spec: attach it as a new delta "
                "instead"
            )


class _unmerged:
    """Unmerge for the duration of a block when anything is merged, merge the same set again
    after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.was = any(h.merged for _, h in iter_hosts(model))

    def __enter__(self) -> None:
        if self.was:
            unmerge(self.model)

    def __exit__(self, *exc: object) -> None:
        if self.was:
            merge(self.model)
