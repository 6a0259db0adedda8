"""Atomic, resumable checkpoint directories without pickle.

Layout of ``out_dir/checkpoint/``::

    model.safetensors      trainable parameters + BatchNorm statistics, by their model names
    optimizer.safetensors  AdamW moments and step counts, keyed "<param name>/<state key>"
    rng.safetensors        torch CPU (and CUDA) generator states, keyed "rank<r>/<generator>"
    best.safetensors       the best evaluated trainable tensors so far (when there are any)
    trainer.json           step, epoch, position in the epoch's permutation, config, optimizer
                           groups, python/numpy RNG states, metric history, and a manifest with
                           the size and SHA-256 of every file above (written last)

The directory is written under a temporary name beside the final one and renamed into place;
the previous checkpoint is first renamed to ``checkpoint.old`` and deleted afterwards, so a kill
at any moment leaves a complete checkpoint under one of the two names (``find`` looks at both).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..io.files import ordinary_mode
from .config import CheckpointError

NAME = "checkpoint"
FORMAT = "deltatune-train-checkpoint"
VERSION = 1
META = "trainer.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    # Make the renames themselves durable; not every platform can open a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(
    out_dir: str | os.PathLike, files: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]
) -> Path:
    """Write ``files`` (name → tensors, saved as ``<name>.safetensors``) and ``meta`` atomically."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final, old = out / NAME, out / f"{NAME}.old"
    for stale in out.glob(f".{NAME}.*.tmp"):  # left by a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}.", suffix=".tmp", dir=out))
    try:
        ordinary_mode(tmp)
        manifest = {}
        for name, tensors in files.items():
            path = tmp / f"{name}.safetensors"
            # Own contiguous CPU copies: safetensors refuses shared storage and views.
            save_file(
                {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
                str(path),
            )
            _fsync(path)
            ordinary_mode(path)
            manifest[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        body = {"format": FORMAT, "version": VERSION, **meta, "files": manifest}
        (tmp / META).write_text(json.dumps(body))
        _fsync(tmp / META)
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def find(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: ``checkpoint/``, or ``checkpoint.old/`` when a kill fell
    between the two renames of :func:`save`; None when there is neither."""
    for candidate in (Path(out_dir) / NAME, Path(out_dir) / f"{NAME}.old"):
        if candidate.is_dir():
            return candidate
    return None


def load(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read and verify a checkpoint directory; any damage is one :class:`CheckpointError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    fix = f"delete {path} to start over, or train without resume"
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} has no {META}: the checkpoint is incomplete; {fix}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / META} is corrupt ({exc}); {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / META} is not a deltatune training checkpoint; {fix}")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {meta.get('version')!r}, this deltatune reads "
            f"{VERSION}; {fix}"
        )
    files: dict[str, dict[str, torch.Tensor]] = {}
    for fname, info in (meta.get("files") or {}).items():
        fpath = path / fname
        if not fpath.is_file():
            raise CheckpointError(f"{fpath} is missing from the checkpoint; {fix}")
        if fpath.stat().st_size != info.get("bytes") or _sha256(fpath) != info.get("sha256"):
            raise CheckpointError(
                f"{fpath} is truncated or corrupt (size/SHA-256 differ from {META}); {fix}"
            )
        try:
            files[fname.removesuffix(".safetensors")] = load_file(str(fpath))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{fpath} is not readable ({str(exc).splitlines()[0]}); {fix}"
            ) from None
    return files, meta
