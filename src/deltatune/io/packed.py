"""Adapters whose tensors are stored packed (written by ``deltatune compress``), read without io
knowing any codec.

A compressed adapter directory holds ``delta.json`` marked ``"compressed": {...}`` beside a
container of packed tensors. Decoding is the compressing package's business, and io may import
only ``core`` and ``methods``, so the package that writes such a container registers how to read
it here: ``compress`` does so when it is imported, and ``deltatune/__init__`` imports it, so the
reader is in place before any adapter is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from ..core.errors import DeltaFileError

#: the container format of a ``compressed`` entry that names none (every file written so far)
DEFAULT_FORMAT = "deltatune-compressed"


class PackedReader(NamedTuple):
    """How to read one packed container format: its decoded tensors, and what ``info`` shows."""

    tensors: Callable[[Path], dict[str, torch.Tensor]]  # raises DeltaFileError on a bad container
    describe: Callable[[Path], dict[str, Any]]


_READERS: dict[str, PackedReader] = {}


def register_packed_reader(fmt: str, reader: PackedReader) -> None:
    """Make adapters packed in container format ``fmt`` loadable by ``dt.load_adapter``."""
    if fmt in _READERS and _READERS[fmt] != reader:
        raise ValueError(f"a reader for packed format {fmt!r} is already registered")
    _READERS[fmt] = reader


def packed_reader(path: Path, config: dict[str, Any]) -> PackedReader:
    """The reader for the compressed adapter at ``path`` whose ``delta.json`` is ``config``."""
    entry = config.get("compressed")
    fmt = entry.get("format", DEFAULT_FORMAT) if isinstance(entry, dict) else DEFAULT_FORMAT
    if fmt not in _READERS:
        raise DeltaFileError(f"{path} holds tensors packed as {fmt!r}, which this deltatune "
                             "cannot read; import deltatune.compress, or upgrade deltatune")
    return _READERS[fmt]
