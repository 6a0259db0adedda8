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
    """Exact name or a dotted suffix of it (``"query"`` matches
    ``"layer.0.attention.self.query"``)."""
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


#: target groups shared by the methods that go on attention projections by default, tried in order:
#: BERT-style, LLaMA-style, GPT-2 (fused), timm ViT (fused), T5
ATTENTION_QV: tuple[tuple[str, ...], ...] = (
    ("query", "value"),
    ("q_proj", "v_proj"),
    ("c_attn",),
    ("qkv",),
    ("q", "v"),
)


def narrowed(spec: "DeltaSpec") -> bool:
    """Whether the spec names its targets (names, a regex or module types) instead of using
    defaults."""
    return spec.targets is not None or spec.target_regex is not None or bool(spec.target_types)


def select_targets(model: nn.Module, spec: "DeltaSpec") -> list[str]:
    """Full names of the modules ``spec`` selects; a clear error when nothing (supported) matches.

    The one selector of the engine. With no selector, a spec whose ``default_scope`` is ``"every"``
    (whole-layer methods: BitFit, LN tuning, SSF, sparse) takes every module it can host by default;
    the others take the first group of ``default_targets`` that matches. Modules kept trainable as a
    whole (``trainable_modules``) and everything inside them are never selected by such a
    whole-layer method.
    """
    candidates = list(iter_candidates(model))
    if spec.default_scope == "every":
        return _select_every(spec, candidates)
    targets, regex, types = spec.targets, spec.target_regex, tuple(spec.target_types)
    if not narrowed(spec):
        targets = _default_targets(spec, candidates)
    chosen = [
        (name, module)
        for name, module in candidates
        if _selected(name, module, targets, regex, types)
        and not any(name_matches(name, e) for e in spec.exclude)
    ]
    if not chosen:
        raise TargetError(_no_match_message(spec, targets, regex, types, candidates))
    unsupported = [(n, m) for n, m in chosen if not spec.can_host(m)]
    if unsupported and (targets is not None or regex is not None):
        raise TargetError(_cannot_host(spec, *unsupported[0]))
    chosen = [(n, m) for n, m in chosen if spec.can_host(m)]
    if not chosen:
        raise TargetError(f"none of the selected modules can host {type(spec).__name__} "
                          f"(it hosts {spec.hosts_what()}): pick other targets")
    # A selected module nested inside another selected one would be wrapped twice: keep the outer.
    names = [n for n, _ in chosen]
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _select_every(spec: "DeltaSpec", candidates) -> list[str]:
    by = narrowed(spec)
    accept = spec.can_host if by else spec.hosts_by_default
    chosen = [
        path
        for path, module in candidates
        if accept(module)
        and (
            not by
            or _selected(path, module, spec.targets, spec.target_regex, tuple(spec.target_types))
        )
        and not any(name_matches(path, e) for e in spec.exclude)
        and not any(_within(path, t) for t in spec.trainable_modules)
    ]
    for path, module in candidates:  # a module named explicitly must be one it can host
        if any(name_matches(path, t) for t in spec.targets or ()) and not spec.can_host(module):
            raise TargetError(_cannot_host(spec, path, module))
    if not chosen:
        where = "among the selected modules" if by else "in the model"
        what = spec.hosts_what() if by else spec.hosts_what(default=True)
        raise TargetError(
            f"{type(spec).__name__} found no {what} {where}; pick targets that include some"
        )
    return chosen


def _cannot_host(spec: "DeltaSpec", path: str, module: nn.Module) -> str:
    kind = module_kind(module)
    what = "" if kind == "other" else f", a {kind} module"
    return (f"{type(spec).__name__} cannot host {path!r} ({type(module).__name__}{what}): it hosts "
            f"{spec.hosts_what()}; pick other targets")


def _within(path: str, pattern: str) -> bool:
    """``path`` is the module ``pattern`` names or lies inside it."""
    parts = path.split(".")
    return any(name_matches(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def default_group(model: nn.Module, groups: tuple[tuple[str, ...], ...]) -> tuple[str, ...] | None:
    """The first of ``groups`` (a spec's ``default_targets``) that matches a module of ``model``."""
    names = [n for n, _ in iter_candidates(model)]
    for group in groups:
        if any(name_matches(n, t) for n in names for t in group):
            return group
    return None


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
    hint = (
        f"closest existing names: {', '.join(close[:5])}"
        if close
        else (
            f"module names look like: {', '.join(names[-3:])}"
            if names
            else "the model has no submodules"
        )
    )
    return (
        f"{type(spec).__name__} targets {wanted} match no module of {type_name(candidates)}; {hint}"
    )


def type_name(candidates) -> str:
    return "the model" if not candidates else f"the model ({len(candidates)} modules)"
