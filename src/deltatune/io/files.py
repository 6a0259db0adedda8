"""Safe file primitives: atomic writes and validated safetensors / JSON reads."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.errors import DeltaFileError


def ordinary_mode(path: str | os.PathLike) -> None:
    """Give a file or directory made by ``tempfile`` (0600/0700) the mode a plain open/mkdir
    would."""
    umask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` for a temp file beside ``path``, then rename it over ``path``.

    A crash at any point leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        ordinary_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write strict JSON: NaN and ±inf become ``null`` (Python's json would write bare ``NaN``,
    which other JSON readers reject); ``allow_nan=False`` makes sure nothing non-finite slips
    through."""

    def finite(value: Any) -> Any:
        if isinstance(value, float):
            return value if value == value and value not in (float("inf"), float("-inf")) else None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    text = json.dumps(finite(data), indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DeltaFileError(
            f"{path} does not exist; point to a directory saved by dt.save_adapter or peft"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeltaFileError(
            f"{path} is not valid JSON ({exc}); the file is corrupt, save it again"
        ) from exc
    if not isinstance(data, dict):
        raise DeltaFileError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def save_tensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    from safetensors.torch import save_file

    # Own, contiguous CPU copies: safetensors refuses shared storage, and nothing aliases the model.
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=metadata))


def load_tensors(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or corrupt file gives one clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DeltaFileError(f"{path} does not exist; save the delta first or check the path")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DeltaFileError(
            f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]}); it is "
            "corrupt or truncated: save or copy it again"
        ) from exc


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 120, **savefig: Any) -> Path:
    """Write a matplotlib figure atomically, in the format of ``path``'s suffix (PNG without one),
    and close it (also when writing fails); ``savefig`` goes to ``fig.savefig`` (e.g.
    ``bbox_inches``)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi, **savefig))
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
