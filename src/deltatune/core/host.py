"""Hosts: wrappers that keep an original module untouched and add named deltas around it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from torch import nn

from .delta import Delta
from .errors import StateError, TargetError
from .quantized import QuantizedBase, merge_quantized, unmerge_quantized

if TYPE_CHECKING:  # pragma: no cover
    from .spec import DeltaSpec, Site


def module_kind(module: nn.Module) -> str:
    """The host kind of a module: linear | conv | embedding | other."""
    if isinstance(module, nn.Linear) or _is_gpt2_conv1d(module):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "other"


def _is_gpt2_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: a Linear whose weight is stored (in, out).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


class Host(nn.Module):
    """Marker base of every module deltatune inserts in place of an original one (``self.base``)."""

    base: nn.Module

    def delta_names(self) -> list[str]:
        raise NotImplementedError

    def part(self, name: str) -> nn.Module:
        """The module holding delta ``name``'s tensors here (saved under this host's path)."""
        raise NotImplementedError

    def spec_of(self, name: str) -> "DeltaSpec":
        return self.part(name).spec

    def set_active(self, names: Sequence[str]) -> None:
        raise NotImplementedError

    @property
    def active(self) -> list[str]:
        """The active delta names here, in order."""
        return list(getattr(self, "_active", []))

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled

    def set_route(self, slots: torch.Tensor | None, names: Sequence[str]) -> None:
        raise NotImplementedError

    def remove(self, name: str) -> None:
        raise NotImplementedError

    def merge(self) -> list[str]:
        return []

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        return None

    @property
    def merged(self) -> list[str]:
        return []


_PLAIN_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


class DeltaHost(Host):
    """Wraps a Linear / Conv / Embedding / GPT-2 Conv1D (or any module, for output-level deltas).

    ``forward`` calls ``base`` and lets each active, unmerged delta transform the output in turn, so
    several deltas stack (parallel ones sum). ``base`` is the original module object, never copied.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.deltas = nn.ModuleDict()
        self.kind = module_kind(base)
        #: weight stored (in, out) instead of (out, in): GPT-2 Conv1D
        self.fan_in_fan_out = _is_gpt2_conv1d(base)
        self.disabled = False
        self._active: list[str] = []
        self._merged: list[str] = []
        self._live: list[Delta] = []
        self._plan: list[tuple[type[Delta], list[Delta], torch.Tensor]] | None = None
        #: what a method's routed_forward keeps for the current route (emptied by set_route)
        self.route_cache: dict[str, object] = {}
        #: quantized base only: how dt.merge folds deltas in, and the blocks kept for unmerge
        self.quantized_merge: tuple[bool, str | None, bool] | None = None
        self.quantized_original: tuple[QuantizedBase | None] | None = None

    # -- geometry of the wrapped module ---------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def base_param(self, name: str) -> nn.Parameter:
        param = getattr(self.base, name, None)
        if param is None:
            raise StateError(f"{type(self.base).__name__} has no {name!r} parameter to merge into")
        return param

    @property
    def in_features(self) -> int:
        b = self.base
        if self.kind == "linear":
            return b.weight.shape[0] if self.fan_in_fan_out else b.in_features
        if self.kind == "conv":
            return b.in_channels
        if self.kind == "embedding":
            return b.num_embeddings
        raise AttributeError("in_features")

    @property
    def out_features(self) -> int:
        b = self.base
        if self.kind == "linear":
            return b.weight.shape[1] if self.fan_in_fan_out else b.out_features
        if self.kind == "conv":
            return b.out_channels
        if self.kind == "embedding":
            return b.embedding_dim
        raise AttributeError("out_features")

    @property
    def max_rank(self) -> int | None:
        """Largest rank a weight change of this layer can have: min(fan-in, fan-out) of its weight
        seen as a matrix (None for a module without one)."""
        b = self.base
        if self.kind in ("linear", "embedding"):
            return min(self.in_features, self.out_features)
        if self.kind == "conv":
            fan_in = b.in_channels // b.groups
            for k in b.kernel_size:
                fan_in *= k
            return min(fan_in, b.out_channels)
        return None

    def conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The wrapped convolution applied to ``x`` with ``weight`` instead of its own and no bias.

        A plain ``nn.ConvNd`` is ``_conv_forward``; a subclass with its own ``forward`` (TensorFlow
        'SAME' padding in EfficientNet ports, timm's ``Conv2dSame``) runs that forward with the
        weight swapped in, so a delta sees the input padding the layer really uses.
        """
        b = self.base
        if type(b).forward in _PLAIN_CONV_FORWARDS:
            return b._conv_forward(x, weight, None)
        params = {"weight": weight}
        if getattr(b, "bias", None) is not None:
            params["bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        return torch.func.functional_call(b, params, (x,))

    # -- state ------------------------------------------------------------------------------------
    def delta_names(self) -> list[str]:
        return list(self.deltas.keys())

    def part(self, name: str) -> Delta:
        return self.deltas[name]

    @property
    def active(self) -> list[str]:
        return list(self._active)

    @property
    def merged(self) -> list[str]:
        return list(self._merged)

    def _refresh(self) -> None:
        self._live = [
            self.deltas[n] for n in self._active if n in self.deltas and n not in self._merged
        ]

    def set_active(self, names: Sequence[str]) -> None:
        if self._merged and list(names) != self._active:
            raise StateError(
                "cannot change the active deltas while some are merged; call dt.unmerge(model) "
                "first"
            )
        self._active = [n for n in names if n in self.deltas]
        self._refresh()

    def add(self, name: str, delta: Delta) -> None:
        if name in self.deltas:
            raise StateError(
                f"delta {name!r} is already attached; detach it first or choose another name"
            )
        self.deltas[name] = delta

    def remove(self, name: str) -> None:
        if name in self._merged:
            raise StateError(
                f"delta {name!r} is merged; call dt.unmerge(model) before detaching it"
            )
        self.deltas[name].release(self)
        del self.deltas[name]
        self._active = [n for n in self._active if n != name]
        self._refresh()

    # -- merge ------------------------------------------------------------------------------------
    def merge(self) -> list[str]:
        """Fold the active deltas into the base weights (in order); return the names merged."""
        if isinstance(self.base, QuantizedBase):  # lossy: done one float layer at a time, as asked
            return merge_quantized(self)
        done = []
        for name in self._active:  # all or nothing: checked before anything is folded in
            delta = self.deltas[name]
            if name not in self._merged and not delta.foldable:
                raise StateError(
                    f"delta {name!r} ({delta.spec.method}) cannot be merged into the weights; "
                    "deactivate it before merging or keep it unmerged"
                )
        for name in self._active:
            if name in self._merged:
                continue
            delta = self.deltas[name]
            delta.merge_into(self)
            self._merged.append(name)
            done.append(name)
        self._refresh()
        return done

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        """Undo the merges (of ``names`` only: the last ones merged, which is what can be undone
        exactly)."""
        if self._merged and unmerge_quantized(self):  # the original quantized blocks back
            self._merged = []
            self._refresh()
            return
        # Reverse order: each merge saw the weights left by the previous one.
        todo = [n for n in reversed(self._merged) if names is None or n in names]
        for name in todo:
            self.deltas[name].unmerge_from(self)
        self._merged = [n for n in self._merged if n not in todo]
        self._refresh()

    # -- routing ----------------------------------------------------------------------------------
    def set_route(self, slots: torch.Tensor | None, names: Sequence[str]) -> None:
        """``slots[i]`` indexes ``names`` for sample ``i`` (-1: base only); ``None`` ends
        routing."""
        self.route_cache = {}
        if slots is None:
            self._plan = None
            return
        if self._merged:
            raise StateError(
                "cannot route per sample while deltas are merged; call dt.unmerge(model) first"
            )
        groups: dict[type[Delta], list[tuple[int, Delta]]] = {}
        for j, name in enumerate(names):
            if name in self.deltas:
                delta = self.deltas[name]
                groups.setdefault(type(delta), []).append((j, delta))
        plan = []
        for cls, members in groups.items():
            # lookup[j + 1] = position of names[j] among this class's members
            # (slot -1 → lookup[0] = -1)
            lookup = torch.full((len(names) + 1,), -1, dtype=torch.long)
            for local, (j, _) in enumerate(members):
                lookup[j + 1] = local
            plan.append((cls, [d for _, d in members], lookup.to(slots.device)[slots + 1]))
        self._plan = plan

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base(x, *args, **kwargs)
        if self.disabled:
            return h
        if self._plan is not None:
            if self._plan and self._plan[0][2].shape[0] != x.shape[0]:
                raise StateError(
                    f"route() was given {self._plan[0][2].shape[0]} entries but the batch has "
                    f"{x.shape[0]} samples; pass one delta name (or None) per sample"
                )
            for cls, members, index in self._plan:
                h = cls.routed_forward(members, index, x, h, self)
            return h
        for delta in self._live:
            h = delta(x, h, self)
        return h

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, deltas={self.delta_names()}, active={self._active}, "
                f"merged={self._merged}")


class ModuleCopy(Host):
    """Keeps a module trainable per delta (e.g. a new classification head): each delta name owns a
    full copy, saved with the delta; the original stays frozen and is used when no copy is
    active."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.copies = nn.ModuleDict()
        self.specs: dict[str, "DeltaSpec"] = {}
        self.disabled = False
        self._active: list[str] = []
        self._route: tuple[torch.Tensor, list[str]] | None = None

    def delta_names(self) -> list[str]:
        return list(self.copies.keys())

    def part(self, name: str) -> nn.Module:
        return self.copies[name]

    def spec_of(self, name: str) -> "DeltaSpec":
        return self.specs[name]

    def add(self, name: str, spec: "DeltaSpec") -> nn.Module:
        import copy

        if name in self.copies:
            raise StateError(f"delta {name!r} already has a trainable copy of this module")
        clone = copy.deepcopy(self.base)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone
        self.specs[name] = spec
        return clone

    def remove(self, name: str) -> None:
        del self.copies[name]
        self.specs.pop(name, None)
        self._active = [n for n in self._active if n != name]

    def set_active(self, names: Sequence[str]) -> None:
        self._active = [n for n in names if n in self.copies]

    def set_route(self, slots: torch.Tensor | None, names: Sequence[str]) -> None:
        self._route = None if slots is None else (slots, list(names))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.base(x, *args, **kwargs)
        if self._route is not None:
            slots, names = self._route
            out = self.base(x, *args, **kwargs)
            for j, name in enumerate(names):
                rows = (slots == j).nonzero().squeeze(1)
                if name in self.copies and rows.numel():
                    part = self.copies[name](x.index_select(0, rows), *args, **kwargs)
                    out = out.index_copy(0, rows, part)
            return out
        if self._active:
            return self.copies[self._active[0]](x, *args, **kwargs)
        return self.base(x, *args, **kwargs)


# -- model surgery ------------------------------------------------------------------------------
def get_module(model: nn.Module, path: str) -> nn.Module:
    module = model
    for part in path.split(".") if path else []:
        module = getattr(module, part)
    return module


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    setattr(get_module(model, parent_path), leaf, new)


def iter_hosts(model: nn.Module) -> Iterator[tuple[str, Host]]:
    for name, module in model.named_modules():
        if isinstance(module, Host):
            yield name, module


def add_delta(
    model: nn.Module, path: str, name: str, build: Callable[["DeltaHost", str], Delta]
) -> Delta:
    """Wrap ``model.<path>`` in a host (once) and add the delta ``build(host, path)`` under
    ``name``."""
    module = get_module(model, path)
    if isinstance(module, ModuleCopy):
        raise TargetError(
            f"{path!r} is already kept trainable as a whole module; it cannot also host a delta"
        )
    host = module if isinstance(module, DeltaHost) else None
    if host is None:
        host = DeltaHost(module)
        # follow the model's mode (new modules start in train mode); flags only: train() would also
        # reset submodules of the base that are deliberately in the other mode
        host.training = host.deltas.training = module.training
    if name in host.deltas:
        raise StateError(
            f"delta {name!r} is already attached to {path!r}; detach it first or choose another "
            "name"
        )
    delta = build(host, path)
    ref = next(iter(module.parameters()), None)
    if ref is not None:
        delta.to(device=ref.device)
    delta.train(host.training)  # a delta added to a model in eval mode must not start dropping out
    host.add(name, delta)
    if host is not module:
        set_module(model, path, host)
    return delta


def remove_delta(model: nn.Module, path: str, name: str) -> None:
    """Remove one named delta; when the host is empty, put the original module object back."""
    host = get_module(model, path)
    if not isinstance(host, Host) or name not in host.delta_names():
        return
    host.remove(name)
    if not host.delta_names():
        set_module(model, path, host.base)


def add_sites(model: nn.Module, name: str, spec: "DeltaSpec", sites: Sequence["Site"]) -> list[str]:
    """The engine's surgery for one attach: add each site's part under ``name``; return the paths
    used.

    Sizes are checked at every site (``spec.check_host``) before the first tensor is allocated; a
    delta with more parameters than the layer it adapts gets one warning for the whole call. A
    failure part-way is undone by :func:`deltatune.attach`, which restores the model exactly."""
    for site in sites:
        module = get_module(model, site.path)
        if site.check and not isinstance(module, ModuleCopy):
            spec.check_host(
                module if isinstance(module, DeltaHost) else DeltaHost(module), site.path
            )
    paths: list[str] = []
    larger: list[tuple[str, int, int]] = []
    for site in sites:
        delta = add_delta(model, site.path, name, site.build)
        if site.path not in paths:
            paths.append(site.path)
        own = sum(p.numel() for p in delta.parameters())
        layer = get_module(model, site.path).base
        base = (layer.in_features * layer.out_features if isinstance(layer, QuantizedBase)
                else sum(p.numel() for p in layer.parameters()))
        if own > base > 0:
            larger.append((site.path, own, base))
    if larger:
        import warnings

        path, own, base = larger[0]
        warnings.warn(
            f"delta {name!r} ({spec.method or type(spec).__name__}) is larger than the layer it "
            f"adapts on {len(larger)} of {len(paths)} modules (e.g. {path}: {own:,} parameters vs "
            f"{base:,}); a smaller rank or width gives the same kind of delta at a fraction of the "
            "size",
            stacklevel=4,
        )
    return paths
