"""Turning command-line / YAML method options into a validated method spec."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..core.errors import SpecError
from ..core.spec import DeltaSpec, registered_methods


def method_names() -> list[str]:
    import deltatune.methods  # noqa: F401  (registers every method)

    return sorted(n for n in registered_methods() if not n.startswith("_"))


def parse_value(text: str) -> Any:
    """``"8"`` → 8, ``"true"`` → True, ``"[a,b]"``/``"a,b"`` stay strings unless valid JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(items: list[str], flag: str = "--opt") -> dict[str, Any]:
    """``["lr=1e-3", "reference=tweet-sentiment:other"]`` →
    ``{"lr": 0.001, "reference": "..."}``."""
    from .common import CLIError

    options: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise CLIError(f"{flag} {item!r} must look like KEY=VALUE")
        options[key.strip()] = parse_value(value)
    return options


def build_spec(method: str, options: dict[str, Any], *, head=()) -> DeltaSpec:
    """The spec of ``method`` with ``options`` (unknown option → one-line error listing valid
    ones)."""
    import deltatune.methods  # noqa: F401

    methods = registered_methods()
    if method not in methods or method.startswith("_"):
        raise SpecError(f"unknown method {method!r}; choose one of: {', '.join(method_names())}")
    cls = methods[method]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    aliases = {"rank": "r", "lora_alpha": "alpha", "target_modules": "targets"}
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        key = key.replace("-", "_")
        key = aliases.get(key, key) if aliases.get(key) in fields else key
        if key not in fields:
            raise SpecError(
                f"{cls.__name__} has no option {key!r}; valid options: {', '.join(sorted(fields))}"
            )
        if key in ("targets", "exclude", "trainable_modules", "target_types") and isinstance(
            value, str
        ):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        kwargs[key] = value
    if head and "trainable_modules" in fields:
        kwargs["trainable_modules"] = tuple(
            dict.fromkeys([*kwargs.get("trainable_modules", ()), *head])
        )
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise SpecError(f"bad options for {cls.__name__}: {exc}") from None
