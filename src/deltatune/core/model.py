"""Model-level operations: attach, activate, disable, route, merge, detach, summarise."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from .errors import StateError, TargetError
from .host import DeltaHost, Host, ModuleCopy, get_module, iter_hosts, set_module
from .quantized import QuantizedBase, check_merge_how, finish_merge, warn_rerounded
from .spec import DeltaSpec
from .targets import iter_candidates, name_matches

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def delta_names(model: nn.Module) -> list[str]:
    """Names of the deltas attached to ``model``, in attach order."""
    seen: dict[str, None] = {}
    for _, host in iter_hosts(model):
        for n in host.delta_names():
            seen.setdefault(n, None)
    return list(seen)


def get_spec(model: nn.Module, name: str) -> DeltaSpec:
    for _, host in iter_hosts(model):
        if name in host.delta_names() and not isinstance(host, ModuleCopy):
            return host.spec_of(name)
    for _, host in iter_hosts(model):
        if name in host.delta_names():
            return host.spec_of(name)
    raise StateError(_unknown_name(model, name))


def host_paths(model: nn.Module, name: str) -> list[str]:
    """Full names of the hosts that hold delta ``name`` (deltas and trainable copies)."""
    return [path for path, host in iter_hosts(model) if name in host.delta_names()]


def _unknown_name(model: nn.Module, name: object) -> str:
    known = delta_names(model)
    return f"no delta named {name!r} is attached; attached: {', '.join(known) if known else 'none'}"


def _require(model: nn.Module, names: Sequence[str | None]) -> None:
    known = set(delta_names(model))
    for n in names:
        if n is not None and n not in known:
            raise StateError(_unknown_name(model, n))


def attach(
    model: nn.Module, spec: DeltaSpec, name: str = "default", *, activate: bool = True
) -> list[str]:
    """Insert ``spec``'s delta into ``model`` under ``name`` and freeze everything else.

    Returns the full names of the modules that host it. With ``activate`` (the default) the new
    delta becomes the only active one. Nothing is changed when an error is raised.
    """
    if not isinstance(spec, DeltaSpec):
        raise TypeError(
            f"attach() needs a method spec such as dt.LoRA(...), got {type(spec).__name__}"
        )
    if not isinstance(name, str) or not _NAME.match(name):
        raise StateError(
            f"delta name {name!r} must be letters, digits, '_' or '-' (no dots or spaces)"
        )
    if name in delta_names(model):
        raise StateError(
            f"a delta named {name!r} is already attached; dt.detach(model, {name!r}) first or pick "
            "another name"
        )
    keep = _resolve_modules(model, spec.trainable_modules)
    snapshot = _Snapshot(model)
    try:
        paths = spec.inject(model, name)
        for path in keep:
            module = get_module(model, path)
            if isinstance(module, DeltaHost):
                raise TargetError(
                    f"{path!r} hosts a delta; it cannot also be kept trainable as a whole module"
                )
            holder = module if isinstance(module, ModuleCopy) else ModuleCopy(module)
            holder.add(name, spec)
            if holder is not module:
                set_module(model, path, holder)
    except BaseException:
        snapshot.restore(name)  # all or nothing: no host, parameter or hook is left behind
        raise
    freeze_base(model)
    if activate:
        set_active(model, [name])
    return paths


class _Snapshot:
    """The model's module tree and hooks before an attach, to put back exactly if the attach fails.

    Methods never roll back themselves: whatever an ``inject`` did before failing (hosts wrapped,
    deltas added to existing hosts, forward hooks registered), this undoes."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.children = [(parent, child_name, child) for parent in model.modules()
                         for child_name, child in parent.named_children()]
        self.hooks = {
            id(m): (
                m,
                {k: dict(v) for k, v in vars(m).items() if "hook" in k and isinstance(v, dict)},
            )
            for m in model.modules()
        }

    def restore(self, name: str) -> None:
        for path, host in list(iter_hosts(self.model)):  # existing hosts drop the new delta's parts
            if name in host.delta_names():
                host.remove(name)
        for parent, child_name, child in self.children:  # every replaced module is put back
            if parent._modules.get(child_name) is not child:
                parent._modules[child_name] = child
        for module, hooks in self.hooks.values():
            for key, before in hooks.items():
                current = getattr(module, key)
                for hook_id in [k for k in current if k not in before]:
                    del current[hook_id]



def _resolve_modules(model: nn.Module, wanted: Sequence[str]) -> list[str]:
    paths: list[str] = []
    candidates = [n for n, _ in iter_candidates(model)]
    for w in wanted:
        hits = [n for n in candidates if name_matches(n, w)]
        if not hits:
            import difflib

            close = difflib.get_close_matches(
                w, candidates + [n.rsplit(".", 1)[-1] for n in candidates], n=3
            )
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise TargetError(f"trainable module {w!r} matches no module of the model{hint}")
        paths += [h for h in hits if h not in paths]
    return paths


def freeze_base(model: nn.Module) -> None:
    """Only delta parameters (and trainable module copies) keep ``requires_grad``."""
    delta_ids: set[int] = set()
    for _, host in iter_hosts(model):
        for n in host.delta_names():
            delta_ids.update(id(p) for p in host.part(n).parameters())
    for p in model.parameters():
        if id(p) not in delta_ids:
            p.requires_grad_(False)


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make exactly ``names`` active (their outputs are summed in order); ``[]`` for none."""
    names = [names] if isinstance(names, str) else list(names)
    _require(model, names)
    for _, host in iter_hosts(model):
        host.set_active(names)


def active(model: nn.Module) -> list[str]:
    out: dict[str, None] = {}
    for _, host in iter_hosts(model):
        for n in host.active:
            out.setdefault(n, None)
    return list(out)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes the base model's outputs (merged deltas are taken
    out)."""
    hosts = [h for _, h in iter_hosts(model)]
    remerge = [h for h in hosts if h.merged]
    for h in remerge:
        h.unmerge()
    for h in hosts:
        h.set_disabled(True)
    try:
        yield model
    finally:
        for h in hosts:
            h.set_disabled(False)
        for h in remerge:
            h.merge()


@contextlib.contextmanager
def route(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Per-sample routing: sample ``i`` of the next forwards uses delta ``names[i]`` (``None``:
    base).

    One forward serves many deltas; LoRA computes all of them in one gathered matmul per layer.
    """
    names = list(names)
    if not names:
        raise StateError("route() needs one delta name (or None) per sample; got an empty list")
    _require(model, names)
    hosts = [h for _, h in iter_hosts(model)]
    if any(h.merged for h in hosts):
        raise StateError(
            "cannot route per sample while deltas are merged; call dt.unmerge(model) first"
        )
    unique = list(dict.fromkeys(n for n in names if n is not None))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    slots = torch.tensor(
        [-1 if n is None else unique.index(n) for n in names], dtype=torch.long, device=device
    )
    try:
        for h in hosts:
            h.set_route(slots, unique)
        yield model
    finally:
        for h in hosts:
            h.set_route(None, unique)


def merge(
    model: nn.Module,
    names: Sequence[str] | None = None,
    *,
    unload: bool = False,
    requantize: bool = False,
    dtype: str | None = None,
    keep_blocks: bool = False,
) -> list[str]:
    """Fold the active deltas (or ``names``, made active) into the base weights.

    With ``unload`` the hosts are removed afterwards, leaving a plain model with merged weights.
    A quantized base (:mod:`deltatune.quant`) needs to be told how, since folding in is lossy:
    ``requantize=True`` quantizes each merged layer again in its own format (the per-layer error:
    :func:`requantization_errors`; ``keep_blocks`` keeps the original blocks so that
    :func:`unmerge` stays exact) or ``dtype="float32"`` (or another float type) makes those layers
    plain float Linears.
    """
    if names is not None:
        set_active(model, names)
    pending = [(path, host) for path, host in iter_hosts(model)
               if isinstance(host, DeltaHost) and any(n not in host.merged for n in host.active)]
    check_merge_how(pending, requantize, dtype, keep_blocks)
    done: dict[str, None] = {}
    for path, host in iter_hosts(model):  # refused before any weight changes
        if isinstance(host, DeltaHost):
            for n in host.active:
                delta = host.part(n)
                if n not in host.merged and not delta.foldable:
                    raise StateError(
                        f"delta {n!r} ({delta.spec.method}) at {path!r} cannot be merged into the "
                        "weights; deactivate it before merging or keep it unmerged"
                    )
    merged: list[tuple[Host, list[str]]] = []
    try:
        for _, host in iter_hosts(model):
            now = host.merge()
            merged.append((host, now))
            for n in now:
                done.setdefault(n, None)
    except BaseException:
        # all or nothing: a delta that cannot fold (an adapter beside a LoRA) leaves no host merged
        for host, now in reversed(merged):
            host.unmerge(now)
        raise
    warn_rerounded([h for h, now in merged if now and isinstance(h, DeltaHost)])
    for _, host in iter_hosts(model):
        if isinstance(host, DeltaHost):
            finish_merge(host)
    if unload:
        for path, host in list(iter_hosts(model)):
            if isinstance(host, ModuleCopy) and host.active:
                set_module(model, path, host.copies[host.active[0]])
            else:
                set_module(model, path, host.base)
    return list(done)


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` (to float tolerance)."""
    for _, host in iter_hosts(model):
        host.unmerge()


def detach(model: nn.Module, name: str | None = None) -> None:
    """Remove delta ``name`` (all deltas if ``None``); emptied hosts give back the original
    modules."""
    if name is not None and name not in delta_names(model):
        raise StateError(_unknown_name(model, name))
    for path, host in list(iter_hosts(model)):
        targets = host.delta_names() if name is None else [name]
        if any(n in host.merged for n in targets):
            host.unmerge()
        for n in targets:
            if n in host.delta_names():
                host.remove(n)
        if not host.delta_names():
            set_module(model, path, host.base)


@dataclass
class TrainableSummary:
    trainable: int
    total: int
    rows: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        width = max([len(r[0]) for r in self.rows] + [6])
        lines = [f"{'module':<{width}}  {'trainable':>12}  {'total':>12}"]
        lines += [f"{n:<{width}}  {t:>12,}  {a:>12,}" for n, t, a in self.rows]
        lines.append(
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: "
            f"{self.percent:.4f}"
        )
        return "\n".join(lines)


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Trainable and total parameter counts (deltas included), with one row per host."""
    # a quantized base layer's weight is blocks (buffers), not a parameter: counted as its values
    quantized = sum(m.in_features * m.out_features for m in model.modules()
                    if isinstance(m, QuantizedBase))
    total = sum(p.numel() for p in model.parameters()) + quantized
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = []
    for path, host in iter_hosts(model):
        params = list(host.parameters())
        rows.append(
            (
                path,
                sum(p.numel() for p in params if p.requires_grad),
                sum(p.numel() for p in params),
            )
        )
    return TrainableSummary(trainable, total, rows)
