"""The merge-method registry: pure tensor functions registered by a decorator.

Every method has the same call shape::

    fn(base, models, *, <per-model params as lists>, <shared params>, out=None) -> Tensor

``base`` and each of ``models`` is a ``torch.Tensor`` or a lazy :class:`~.tensors.TensorSource` of one
parameter; per-model parameters (``weight``, ``density``, ...) are lists aligned with ``models``. With
``out`` (a chunk sink) the result is streamed out block by block and ``None`` is returned. The same
functions serve in-memory merges, the streaming checkpoint merger and the mergekit-compatible CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from .errors import MergeConfigError, MergeError
from .tensors import TensorLike, shape_of


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: the function and what its inputs and parameters must look like."""

    name: str
    fn: Callable[..., torch.Tensor | None]
    paper: str
    needs_base: bool
    model_params: Mapping[str, Any] = field(default_factory=dict)
    shared_params: Mapping[str, Any] = field(default_factory=dict)
    min_models: int = 1
    max_models: int | None = None
    #: a per-model statistics file the method reads beside each tensor ("fisher", "gram")
    stats: str | None = None
    #: mergekit 0.1.5 has a method of this name with the same semantics
    mergekit: bool = False

    @property
    def summary(self) -> str:
        doc = (self.fn.__doc__ or "").strip().splitlines()
        return doc[0] if doc else self.name

    def __call__(self, base: TensorLike | None, models: Sequence[TensorLike], **params: Any) -> torch.Tensor | None:
        return self.fn(base, models, **params)

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        if self.needs_base and not has_base:
            raise MergeError(f"merge method {self.name!r} needs a base model; set base_model (the model the others were fine-tuned from)")
        if n_models < self.min_models:
            raise MergeError(f"merge method {self.name!r} needs at least {self.min_models} models besides the base; got {n_models}")
        if self.max_models is not None and n_models > self.max_models:
            raise MergeError(f"merge method {self.name!r} takes at most {self.max_models} models besides the base; got {n_models}")

    def resolve(self, per_model: Sequence[Mapping[str, Any]], shared: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments for :attr:`fn` from per-model and shared settings (defaults filled in)."""
        known = set(self.model_params) | set(self.shared_params)
        for scope in [shared, *per_model]:
            unknown = sorted(set(scope) - known)
            if unknown:
                raise MergeConfigError(
                    f"merge method {self.name!r} has no parameter {unknown[0]!r}; it takes: {', '.join(sorted(known)) or 'none'}"
                )
        kwargs: dict[str, Any] = {}
        for key, default in self.model_params.items():
            kwargs[key] = [_typed(self.name, key, m.get(key, shared.get(key, default)), default) for m in per_model]
        for key, default in self.shared_params.items():
            kwargs[key] = _typed(self.name, key, shared.get(key, default), default)
        return kwargs


def _typed(method: str, key: str, value: Any, default: Any) -> Any:
    """``value`` converted to the type of ``default`` (YAML may give "1e-3" as a string)."""
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif isinstance(default, (int, float)):
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if isinstance(default, float):
                return float(number)
            if float(number).is_integer():
                return int(number)
    else:
        return value
    raise MergeConfigError(f"{method} parameter {key!r} must be a {type(default).__name__}, got {value!r}")


_METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    paper: str,
    needs_base: bool,
    model_params: Mapping[str, Any] | None = None,
    shared_params: Mapping[str, Any] | None = None,
    min_models: int = 1,
    max_models: int | None = None,
    stats: str | None = None,
    mergekit: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as merge method ``name`` (see the module docstring for the call shape)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        _METHODS[name] = MergeMethod(
            name, fn, paper, needs_base, dict(model_params or {}), dict(shared_params or {}),
            min_models, max_models, stats, mergekit,
        )
        return fn

    return wrap


def get_method(name: str) -> MergeMethod:
    from . import methods  # noqa: F401  (registration side effect)

    if name not in _METHODS:
        raise MergeConfigError(f"unknown merge method {name!r}; known: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def merge_methods() -> dict[str, MergeMethod]:
    """Every registered method by name."""
    from . import methods  # noqa: F401

    return dict(_METHODS)


def common_shape(base: TensorLike | None, models: Sequence[TensorLike]) -> torch.Size:
    """The shape every input shares (a clear error naming the first that differs)."""
    inputs = ([base] if base is not None else []) + list(models)
    if not inputs:
        raise MergeError("nothing to merge: pass at least one model tensor")
    shape = shape_of(inputs[0])
    for i, x in enumerate(inputs[1:], 1):
        if shape_of(x) != shape:
            raise MergeError(f"input {i} has shape {tuple(shape_of(x))} but input 0 has {tuple(shape)}; merge tensors of one architecture")
    return shape
