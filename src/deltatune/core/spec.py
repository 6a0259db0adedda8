"""Method specs: small frozen dataclasses, validated on creation, serialisable to JSON.

A spec is one point of the unified view (function, position, insertion, scaling). Each method file
defines a spec subclass with ``method = "<name>"`` and registers it with :func:`register`; the spec
knows which host kinds it supports and builds the per-host :class:`~deltatune.core.delta.Delta`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, get_args, get_origin

from .errors import SpecError
from .example import Example
from .peft_layout import PeftLayout
from .registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from .delta import Delta
    from .host import DeltaHost

#: every method spec by its ``method`` name (the name saved configs use)
METHODS: Registry[type["DeltaSpec"]] = Registry(
    "method", SpecError, message="unknown method {name!r} in config{hint} (known methods: {known})",
    key=lambda cls: cls.method,
)


def register(cls: type["DeltaSpec"]) -> type["DeltaSpec"]:
    """Class decorator: make a spec loadable by its ``method`` name (used by saved configs)."""
    if not cls.method:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute `method`")
    return METHODS.register(cls)


def registered_methods() -> dict[str, type["DeltaSpec"]]:
    """Every registered (public) spec class by method name."""
    return dict(METHODS.items())


def spec_from_dict(data: dict[str, Any]) -> "DeltaSpec":
    """Rebuild a spec from :meth:`DeltaSpec.to_dict`; unknown keys (from newer versions) warn.

    The values come from a file, so each is checked against its field's type first: a wrong one is a
    one-line :class:`SpecError` naming the field, never a ``TypeError`` from inside validation."""
    if not isinstance(data, dict):
        raise SpecError(f"a spec config must be an object of options, not {type(data).__name__}")
    data = dict(data)
    method = data.pop("method", None)
    cls = METHODS.get(method)
    names = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        warnings.warn(
            f"ignoring unknown {method} config keys {unknown} (written by a newer deltatune?)",
            stacklevel=2,
        )
    kwargs = {k: v for k, v in data.items() if k in names}
    hints = _type_hints(cls)
    for key, value in kwargs.items():
        if key in hints and not _fits(value, hints[key]):
            raise SpecError(
                f"{cls.__name__}.{key}={value!r} has the wrong type for this option"[:300]
            )
    try:
        return cls(**kwargs)
    except (TypeError, AttributeError, KeyError) as exc:  # a type the check above cannot describe
        raise SpecError(f"{cls.__name__} config holds a value of the wrong type ({exc})") from None


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value can stand for a field annotated ``hint`` (unknown hints: let validate
    decide)."""
    import types
    from typing import Union

    origin = get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_fits(value, arg) for arg in get_args(hint))
    if origin is Literal:
        return True  # checked with a better message by _check_literals
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if isinstance(value, str):
            return True  # a single name is accepted where a tuple of names is expected
        if not isinstance(value, (list, tuple)):
            return False
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis or origin is list and args:
            return all(_fits(v, args[0]) for v in value)
        return True
    if origin is dict:
        if not isinstance(value, dict):
            return False
        args = get_args(hint)
        return not args or all(isinstance(k, str) and _fits(v, args[1]) for k, v in value.items())
    return True


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class DeltaSpec:
    """Common fields of every method: *where* the delta goes (position in the unified view).

    - ``targets``: module names or name suffixes (``"query"`` matches ``...attention.self.query``).
    - ``target_regex``: a regular expression that must match a module's full name.
    - ``target_types``: module class names (``"Linear"``, ``"Conv2d"``); alone, selects every such
      module.
    - ``exclude``: names/suffixes to leave out.
    - ``trainable_modules``: modules (e.g. a new classification head) that train beside the delta;
      each delta gets its own copy, saved with it.
    With no selector given, the method's ``default_targets`` are used.
    """

    method: ClassVar[str] = ""
    #: host kinds the method supports (see ``DeltaHost.kind``)
    host_kinds: ClassVar[tuple[str, ...]] = ("linear",)
    #: default target suffixes tried in order; the first group that matches anything is used
    default_targets: ClassVar[tuple[tuple[str, ...], ...]] = ()

    #: with no selector: ``"defaults"`` takes the first group of ``default_targets`` that matches;
    #: ``"every"`` takes every module :meth:`hosts_by_default` admits (whole-layer methods: BitFit,
    #: SSF)
    default_scope: ClassVar[Literal["defaults", "every"]] = "defaults"
    #: what the method can host, in words, for messages (default: built from ``host_kinds``)
    host_what: ClassVar[str] = ""
    #: the saved tensors are low-rank factors already (LoRA, VeRA, AdaLoRA): low-rank compression of
    #: them gains nothing
    factored: ClassVar[bool] = False

    #: the method's peft file layout (see :mod:`~deltatune.core.peft_layout`); None: deltatune's
    #: format only
    peft: ClassVar[PeftLayout | None] = None

    #: the method's own test example and tolerance for the shared contract tests (every
    #: registered method declares one; see :class:`~deltatune.core.example.Example`)
    example: ClassVar[Example | None] = None

    def __new__(cls, *args: Any, **kwargs: Any) -> "DeltaSpec":
        # The dataclass __init__ would raise a bare TypeError for a misspelt option; name the field
        # and the closest real ones instead (specs are built from user configs and CLI flags).
        names = [f.name for f in fields(cls)] if dataclasses.is_dataclass(cls) else []
        for key in kwargs:
            if names and key not in names:
                close = difflib.get_close_matches(key, names, n=3)
                hint = (
                    f"did you mean {', '.join(close)}?"
                    if close
                    else f"valid options: {', '.join(names)}"
                )
                raise SpecError(f"{cls.__name__} has no option {key!r}; {hint}")
        if names and len(args) > len(names):
            raise SpecError(
                f"{cls.__name__} takes at most {len(names)} options, got {len(args)} positional "
                "values; pass options by name"
            )
        return super().__new__(cls)

    targets: tuple[str, ...] | None = None
    target_regex: str | None = None
    target_types: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    trainable_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, _freeze(value))
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        for name in ("target_types", "exclude", "trainable_modules"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, (getattr(self, name),))
        if self.target_regex is not None:
            try:
                re.compile(self.target_regex)
            except re.error as exc:
                self.fail("target_regex", f"is not a valid regular expression ({exc})")
        self._check_literals()
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def fail(self, field: str, problem: str) -> None:
        """Raise the one-line error for a bad field value."""
        value = getattr(self, field, None)
        raise SpecError(f"{type(self).__name__}.{field}={value!r} {problem}")

    def _check_literals(self) -> None:
        hints = _type_hints(type(self))
        for f in fields(self):
            hint = hints.get(f.name)
            if hint is not None and get_origin(hint) is Literal:
                allowed = get_args(hint)
                if getattr(self, f.name) not in allowed:
                    self.fail(f.name, f"is not one of {', '.join(map(repr, allowed))}")

    def validate(self) -> None:
        """Method-specific checks; call :meth:`fail` on a bad value."""

    # -- where it goes and how it is built (the engine does the surgery) ---------------------------
    def can_host(self, module: "nn.Module") -> bool:
        """Whether this method can put a delta on ``module`` (default: its kind is in
        ``host_kinds``)."""
        from .host import module_kind

        return module_kind(module) in self.host_kinds

    def hosts_by_default(self, module: "nn.Module") -> bool:
        """With ``default_scope = "every"`` and no selector, the modules the method takes."""
        return self.can_host(module)

    def hosts_what(self, default: bool = False) -> str:
        """What the method hosts, in words (``default``: what it takes when no selector is
        given)."""
        if self.host_what:
            return self.host_what
        return " / ".join(self.host_kinds) + " modules"

    def check_host(self, host: "DeltaHost", module_name: str) -> None:
        """Check this spec's sizes against one host's dimensions before any delta tensor exists.

        Called for every site before the first delta is built, so an impossible size (a rank above
        the layer's) costs no memory; methods with a size option override it and raise
        :class:`SpecError` naming the layer, the size and the limit."""

    def check_targets(self, model: "nn.Module", paths: list[str]) -> None:
        """Checks over the whole selection before anything is built (a budget over all the layers,
        the size of state shared by them); raise :class:`SpecError` with :meth:`fail`."""

    def shared_state(self, model: "nn.Module", paths: list[str]) -> Any:
        """State shared by all the hosts of one attach (VeRA's frozen projection), built once and
        passed to :meth:`make_delta` as its third argument; ``None`` (the default) passes
        nothing."""
        return None

    def make_delta(self, host: "DeltaHost", module_name: str) -> "Delta":
        """Build the delta for one host (methods with :meth:`shared_state` take it as a third
        argument)."""
        raise NotImplementedError

    def sites(self, model: "nn.Module") -> list["Site"]:
        """Where the delta goes and how each part is built: by default the selected modules, each
        with :meth:`make_delta`. Methods whose delta spans several modules per position (an adapter
        with an input tap, a side network's rungs, LoRA's extra bias shifts) override this, and only
        this."""
        from .targets import select_targets

        paths = select_targets(model, self)
        self.check_targets(model, paths)
        shared = self.shared_state(model, paths)
        if shared is None:
            return [Site(p, self.make_delta) for p in paths]
        return [
            Site(p, lambda host, path, shared=shared: self.make_delta(host, path, shared))
            for p in paths
        ]

    def inject(self, model: "nn.Module", name: str) -> list[str]:
        """Put this delta into ``model`` under ``name``; return the full names of the hosts used.

        The engine's surgery: wrap every site's module in a :class:`DeltaHost` and add its part.
        Only deltas that are not host deltas override it (virtual tokens: prompt and prefix tuning;
        a composition of such members). :func:`deltatune.attach` undoes everything on any failure.
        """
        from .host import add_sites

        return add_sites(model, name, self, self.sites(model))

    # -- training ------------------------------------------------------------------------------
    def training_callbacks(self, name: str, total_steps: int) -> list[Any]:
        """Trainer callbacks this method needs to train as its paper does, for delta ``name`` in a
        run of ``total_steps`` optimizer steps (AdaLoRA's pruning, IncreLoRA's growth); none for
        most.

        ``deltatune.train.fit`` adds them for every attached delta (``spec_callbacks=True``). They
        follow the protocol of :mod:`deltatune.train.callbacks`; core only passes them on, it never
        imports them."""
        return []

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> "DeltaSpec":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Site:
    """One place a delta goes: a module path and how its part is built there
    (``build(host, path)``). ``check=False`` skips the spec's :meth:`DeltaSpec.check_host` there (a
    tap that only records)."""

    path: str
    build: Callable[["DeltaHost", str], "Delta"]
    check: bool = True


def _type_hints(cls: type) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(cls)
    except Exception:  # pragma: no cover - unresolvable forward refs
        return {}
