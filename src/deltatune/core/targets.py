"""Choosing target modules by name, suffix, regex and/or type."""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING, Iterator

from torch import nn

from .errors import TargetError
from .host import Host, module_kind

if TYPE_CHECKING:  # pragma: no cover
    from .spec import DeltaSpec


def iter_candidates(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, original module) pairs; a host stands for the module it wraps and is not entered."""
    for child_name, child in model.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        if isinstance(child, Host):
            yield name, child.base
            continue
        yield name, child
        yield from iter_candidates(child, name)


def name_matches(name: str, pattern: str) -> bool:
    """Exact name or a dotted suffix of it (``"query"`` matches ``"layer.0.attention.self.query"``)."""
    return name == pattern or name.endswith("." + pattern)


def _selected(name: str, module: nn.Module, targets, regex, types) -> bool:
    by_name = None
    if targets is not None or regex is not None:
        by_name = (targets is not None and any(name_matches(name, t) for t in targets)) or (
            regex is not None and re.fullmatch(regex, name) is not None
        )
    by_type = None
    if types:
        by_type = type(module).__name__ in types or module_kind(module) in types
    if by_name is None:
        return bool(by_type)
    return by_name and (by_type is None or by_type)


def select_targets(model: nn.Module, spec: "DeltaSpec") -> list[str]:
    """Full names of the modules ``spec`` selects; a clear error when nothing (supported) matches."""
    candidates = list(iter_candidates(model))
    targets, regex, types = spec.targets, spec.target_regex, tuple(spec.target_types)
    if targets is None and regex is None and not types:
        targets = _default_targets(spec, candidates)
    chosen = [
        (name, module)
        for name, module in candidates
        if _selected(name, module, targets, regex, types)
        and not any(name_matches(name, e) for e in spec.exclude)
    ]
    if not chosen:
        raise TargetError(_no_match_message(spec, targets, regex, types, candidates))
    unsupported = [(n, m) for n, m in chosen if module_kind(m) not in spec.host_kinds]
    if unsupported and (targets is not None or regex is not None):
        name, module = unsupported[0]
        kinds = ", ".join(spec.host_kinds)
        raise TargetError(
            f"{type(spec).__name__} cannot host {name!r} ({type(module).__name__}); "
            f"it supports {kinds} modules: pick other targets"
        )
    chosen = [(n, m) for n, m in chosen if module_kind(m) in spec.host_kinds]
    if not chosen:
        raise TargetError(
            f"none of the selected modules can host {type(spec).__name__} "
            f"(supports {', '.join(spec.host_kinds)}): pick other targets"
        )
    # A selected module nested inside another selected one would be wrapped twice: keep the outer.
    names = [n for n, _ in chosen]
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _default_targets(spec: "DeltaSpec", candidates) -> tuple[str, ...]:
    for group in spec.default_targets:
        if any(name_matches(n, t) for n, _ in candidates for t in group):
            return group
    raise TargetError(
        f"{type(spec).__name__} has no default targets for this model; pass targets=[...] "
        f"(e.g. {', '.join(_leaf_examples(candidates))})"
    )


def _leaf_examples(candidates, limit: int = 6) -> list[str]:
    leaves = []
    for name, module in candidates:
        if module_kind(module) in ("linear", "conv") and name.rsplit(".", 1)[-1] not in leaves:
            leaves.append(name.rsplit(".", 1)[-1])
    return [repr(x) for x in leaves[:limit]]


def _no_match_message(spec, targets, regex, types, candidates) -> str:
    names = [n for n, _ in candidates]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted = list(targets or []) + ([regex] if regex else []) + list(types)
    close: list[str] = []
    for w in targets or []:
        for pool in (leaves, names):
            for match in difflib.get_close_matches(w, pool, n=3, cutoff=0.5):
                if match not in close:
                    close.append(match)
    hint = f"closest existing names: {', '.join(close[:5])}" if close else (
        f"module names look like: {', '.join(names[-3:])}" if names else "the model has no submodules"
    )
    return f"{type(spec).__name__} targets {wanted} match no module of {type_name(candidates)}; {hint}"


def type_name(candidates) -> str:
    return "the model" if not candidates else f"the model ({len(candidates)} modules)"
