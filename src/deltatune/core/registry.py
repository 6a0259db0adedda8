"""One registry idiom for everything deltatune looks up by name.

Methods, merge methods, codecs, continual strategies, test-time methods, shift tests, accuracy
estimators, bundled models and bundled data sets are each one :class:`Registry`, kept in the package
of their layer. An entry is added with ``register`` (a decorator, with or without a name, or a plain
call with a name and the object) and found with ``get``, which turns a misspelt name into a one-line
error of the registry's own error class naming the kind and the closest names::

    CODECS = Registry("codec", CompressError)

    @CODECS.register("int8")
    def int8(...): ...

    CODECS.get("int9")  # CompressError: unknown codec 'int9'; did you mean 'int8'? (known: ...)

Registering a name twice is a programming error (a ``ValueError`` at import), never a silent
replacement. Entries registered with ``internal=True`` are found by ``get`` but left out of
``names()``, iteration and error messages (e.g. a storage codec the user never picks).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar, overload

T = TypeVar("T")

#: the error message of an unknown name: ``{kind}``, ``{name}`` (the name asked for, ``{name!r}``
#: to quote it), ``{hint}`` ("; did you mean 'x'?" or empty) and ``{known}`` (the public names)
DEFAULT_MESSAGE = "unknown {kind} {name!r}{hint} (known: {known})"


class Registry(Generic[T]):
    """Named entries of one kind, in registration order.

    ``kind`` names the entries in errors ("merge method"); ``error`` is the exception class of an
    unknown name; ``message`` the error's format (see :data:`DEFAULT_MESSAGE`); ``quote`` whether
    the suggested names are quoted; ``key`` derives a name from an object registered without one
    (default: its ``__name__``); ``load`` is called once before the first lookup, to import the
    modules whose registration lines fill the registry.
    """

    def __init__(
        self,
        kind: str,
        error: type[Exception] = LookupError,
        *,
        message: str = DEFAULT_MESSAGE,
        quote: bool = True,
        key: Callable[[Any], str] | None = None,
        load: Callable[[], object] | None = None,
    ) -> None:
        self.kind = kind
        self.error = error
        self.message = message
        self.quote = quote
        self._key = key
        self._load = load
        self._entries: dict[str, T] = {}
        self._internal: set[str] = set()

    # -- adding ------------------------------------------------------------------------------
    @overload
    def register(self, name: str, obj: T, /, *, internal: bool = False) -> T: ...
    @overload
    def register(
        self, name: str | None = None, /, *, internal: bool = False
    ) -> Callable[[T], T]: ...
    @overload
    def register(self, obj: T, /, *, internal: bool = False) -> T: ...

    def register(self, name: Any = None, obj: Any = None, /, *, internal: bool = False) -> Any:
        """``@reg.register``, ``@reg.register("name")`` or ``reg.register("name", obj)``."""
        if obj is not None:
            return self._add(name, obj, internal)
        if name is None or isinstance(name, str):
            return lambda target: self._add(name, target, internal)
        return self._add(None, name, internal)  # bare decorator: the object itself

    def _add(self, name: str | None, obj: T, internal: bool) -> T:
        if name is None:
            name = self._key(obj) if self._key is not None else getattr(obj, "__name__", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name to be registered, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        if internal:
            self._internal.add(name)
        return obj

    # -- finding -----------------------------------------------------------------------------
    def _loaded(self) -> dict[str, T]:
        if self._load is not None:
            load, self._load = self._load, None
            load()
        return self._entries

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name raises ``error`` with the closest names."""
        entries = self._loaded()
        if isinstance(name, str) and name in entries:
            return entries[name]
        raise self.error(self.unknown(name))

    def unknown(self, name: Any) -> str:
        """The one-line message for an unknown ``name``."""
        public = self.names()
        close = difflib.get_close_matches(str(name), public, n=2)
        shown = [repr(c) if self.quote else c for c in close]
        hint = f"; did you mean {' or '.join(shown)}?" if close else ""
        return self.message.format(kind=self.kind, name=name, hint=hint, known=", ".join(public))

    def names(self) -> tuple[str, ...]:
        """Public names in registration order."""
        return tuple(n for n in self._loaded() if n not in self._internal)

    def items(self) -> list[tuple[str, T]]:
        """Public ``(name, entry)`` pairs in registration order."""
        return [(n, e) for n, e in self._loaded().items() if n not in self._internal]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._loaded()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
