"""The merge-method registry: pure tensor functions registered by a decorator.

Every method has the same call shape::

    fn(base, models, *, <per-model params as lists>, <shared params>, out=None) -> Tensor

``base`` and each of ``models`` is a ``torch.Tensor`` or a lazy :class:`~.tensors.TensorSource` of
one parameter; per-model parameters (``weight``, ``density``, ...) are lists aligned with
``models``. With ``out`` (a chunk sink) the result is streamed out block by block and ``None`` is
returned. The same functions serve in-memory merges, the streaming checkpoint merger and the
mergekit-compatible CLI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..core.registry import Registry
from .errors import MergeConfigError, MergeError
from .tensors import TensorLike, shape_of


@dataclass(frozen=True)
class Limit:
    """The values a numeric parameter accepts: finite, between ``lo`` and ``hi`` (open ends
    excluded)."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def __contains__(self, value: float) -> bool:
        try:
            number = float(value)
        except OverflowError:  # a YAML integer with hundreds of digits
            return False
        if not math.isfinite(number) or (self.integer and not number.is_integer()):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.lo == -math.inf and self.hi == math.inf:
            return kind
        if self.hi == math.inf:
            return f"{kind} {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo == -math.inf:
            return f"{kind} {'<' if self.hi_open else '<='} {self.hi:g}"
        return (
            f"{kind} in {'(' if self.lo_open else '['}{self.lo:g}, "
            f"{self.hi:g}{')' if self.hi_open else ']'}"
        )


#: a finite number of any size and sign (every numeric parameter is at least this)
FINITE = Limit()
#: a fraction of the entries kept (density): more than none, at most all
FRACTION = Limit(0.0, 1.0, lo_open=True)
#: an interpolation factor or mixing share
UNIT = Limit(0.0, 1.0)
#: a random seed (hashed with each chunk's identity, so any integer)
SEED = Limit(integer=True)


def check_weight_sum(kwargs: Mapping[str, Any]) -> None:
    """Normalising divides by the summed weights: a zero sum would make every merged value inf or
    NaN (methods without a ``normalize`` switch always normalise)."""
    weights = kwargs.get("weight")
    if not weights or not kwargs.get("normalize", True):
        return
    if abs(math.fsum(weights)) <= 1e-8 * max(1.0, *(abs(w) for w in weights)):
        raise MergeConfigError(
            f"the weights {list(weights)} sum to 0 and are normalised by their sum; "
            "change a weight or set normalize: false"
        )


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
    #: accepted ranges of numeric parameters (any other numeric parameter must be finite)
    limits: Mapping[str, Limit] = field(default_factory=dict)
    #: checks across parameters of one tensor's resolved keyword arguments (raise MergeConfigError)
    check: Callable[[Mapping[str, Any]], None] | None = None

    @property
    def summary(self) -> str:
        doc = (self.fn.__doc__ or "").strip().splitlines()
        return doc[0] if doc else self.name

    def __call__(
        self, base: TensorLike | None, models: Sequence[TensorLike], **params: Any
    ) -> torch.Tensor | None:
        return self.fn(base, models, **params)

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        if self.needs_base and not has_base:
            raise MergeError(
                f"merge method {self.name!r} needs a base model; set base_model (the model the "
                "others were fine-tuned from)"
            )
        if n_models < self.min_models:
            raise MergeError(
                f"merge method {self.name!r} needs at least {self.min_models} models besides the "
                f"base; got {n_models}"
            )
        if self.max_models is not None and n_models > self.max_models:
            raise MergeError(
                f"merge method {self.name!r} takes at most {self.max_models} models besides the "
                f"base; got {n_models}"
            )

    def resolve(self, per_model: Sequence[Mapping[str, Any]], shared: Mapping[str, Any],
                where: str = "") -> dict[str, Any]:
        """Keyword arguments for :attr:`fn` from per-model and shared settings (defaults filled in),
        each value checked against its declared range; ``where`` prefixes errors (e.g. the
        tensor)."""
        known = set(self.model_params) | set(self.shared_params)
        for scope in [shared, *per_model]:
            unknown = sorted(set(scope) - known)
            if unknown:
                raise MergeConfigError(
                    f"{where}merge method {self.name!r} has no parameter {shown(unknown[0])!r}; it "
                    f"takes: {', '.join(sorted(map(shown, known))) or 'none'}"
                )
        kwargs: dict[str, Any] = {}
        for key, default in self.model_params.items():
            kwargs[key] = [
                self.value(key, m.get(key, shared.get(key, default)), where) for m in per_model
            ]
        for key, default in self.shared_params.items():
            kwargs[key] = self.value(key, shared.get(key, default), where)
        if self.check is not None:
            try:
                self.check(kwargs)
            except MergeConfigError as exc:
                raise MergeConfigError(f"{where}{exc}") from None
        return kwargs

    def value(self, key: str, value: Any, where: str = "") -> Any:
        """One parameter value converted to its type and checked against its range (a one-line
        error naming ``where``, the parameter and the accepted values otherwise)."""
        limit = self.limits.get(key, FINITE)
        default = self.model_params.get(key, self.shared_params.get(key))
        if default is None and limit.integer and value is not None:
            default = 0  # an optional integer (seed): None or an integer
        try:
            typed = _typed(self.name, key, value, default)
        except MergeConfigError as exc:
            raise MergeConfigError(f"{where}{exc}") from None
        if isinstance(typed, (int, float)) and not isinstance(typed, bool) and typed not in limit:
            raise MergeConfigError(
                f"{where}{self.name} parameter {shown(key)!r} must be {limit}, got {_short(value)}"
            )
        return typed


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
                try:
                    return float(number)
                except OverflowError:  # an integer beyond float range: out of every limit
                    return math.inf if number > 0 else -math.inf
            if not isinstance(number, float) or (math.isfinite(number) and number.is_integer()):
                return int(number)
    else:
        return value
    kind = (
        "true or false"
        if isinstance(default, bool)
        else "a float"
        if isinstance(default, float)
        else "an integer"
    )
    raise MergeConfigError(f"{method} parameter {shown(key)!r} must be {kind}, got {_short(value)}")


def shown(key: str) -> str:
    """A parameter's name as the config spells it (``lambda_`` is mergekit's ``lambda``)."""
    return key.rstrip("_")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _load_methods() -> None:
    from . import methods  # noqa: F401  (registration side effect)


#: every merge method by name (filled by the ``@merge_method`` lines of the algebra modules)
MERGE_METHODS: Registry[MergeMethod] = Registry(
    "merge method", MergeConfigError, load=_load_methods)


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
    limits: Mapping[str, Limit] | None = None,
    check: Callable[[Mapping[str, Any]], None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as merge method ``name`` (see the module docstring for the call
    shape)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        MERGE_METHODS.register(name, MergeMethod(
            name, fn, paper, needs_base, dict(model_params or {}), dict(shared_params or {}),
            min_models, max_models, stats, mergekit, dict(limits or {}), check,
        ))
        return fn

    return wrap


def get_method(name: str) -> MergeMethod:
    return MERGE_METHODS.get(name)


def merge_methods() -> dict[str, MergeMethod]:
    """Every registered method by name."""
    return dict(MERGE_METHODS.items())


def common_shape(base: TensorLike | None, models: Sequence[TensorLike]) -> torch.Size:
    """The shape every input shares (a clear error naming the first that differs)."""
    inputs = ([base] if base is not None else []) + list(models)
    if not inputs:
        raise MergeError("nothing to merge: pass at least one model tensor")
    shape = shape_of(inputs[0])
    for i, x in enumerate(inputs[1:], 1):
        if shape_of(x) != shape:
            raise MergeError(
                f"input {i} has shape {tuple(shape_of(x))} but input 0 has {tuple(shape)}; merge "
                "tensors of one architecture"
            )
    return shape
