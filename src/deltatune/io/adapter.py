"""Saving and loading deltas: deltatune's own directory format, and peft's (via :mod:`.peft`).

deltatune format — a directory with
  ``delta.safetensors``  only the delta's tensors, keys ``<module path>.<tensor>``;
  ``delta.json``         format + version, the spec, the base-model fingerprint (the shapes of
                         every hosting module's parameters), so a delta is never silently loaded
                         onto another base, and the sha256 of ``delta.safetensors``
                         (``"checksums"``), so a corrupt copy is refused (see :mod:`.checks`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import DeltaFileError, SpecError, StateError
from ..core.host import ModuleCopy, get_module, iter_hosts
from ..core.model import attach, delta_names, detach, get_spec
from ..core.spec import DeltaSpec, spec_from_dict
from .checks import (
    check_header,
    check_value,
    file_sha256,
    tensor_header,
    validate_delta_config,
    verify_file,
)
from .files import load_tensors, read_json, save_tensors, write_json

FORMAT = "deltatune-delta"
FORMAT_VERSION = 1
DELTA_JSON, DELTA_TENSORS = "delta.json", "delta.safetensors"
PEFT_JSON, PEFT_TENSORS = "adapter_config.json", "adapter_model.safetensors"


def _pick_name(model: nn.Module, name: str | None) -> str:
    names = delta_names(model)
    if name is None:
        if len(names) != 1:
            raise StateError(
                f"the model holds deltas {names or 'none'}; pass name=... to choose which one"
            )
        return names[0]
    if name not in names:
        raise StateError(
            f"no delta named {name!r} is attached; attached: {', '.join(names) or 'none'}"
        )
    return name


def parts_of(model: nn.Module, name: str) -> tuple[dict[str, Any], dict[str, nn.Module]]:
    """(deltas by host path, trainable module copies by path) of delta ``name``."""
    deltas, copies = {}, {}
    for path, host in iter_hosts(model):
        if name in host.delta_names():
            (copies if isinstance(host, ModuleCopy) else deltas)[path] = host.part(name)
    return deltas, copies


def fingerprint(model: nn.Module, paths: list[str]) -> dict[str, Any]:
    """Shapes of the base parameters of the modules at ``paths`` (+ a short hash of them)."""
    shapes = {}
    for path in sorted(paths):
        module = get_module(model, path)
        base = module.base if hasattr(module, "base") else module
        shapes[path] = {n: list(p.shape) for n, p in base.named_parameters(recurse=False)}
    digest = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]
    return {"sha256_16": digest, "modules": shapes}


def check_fingerprint(model: nn.Module, fp: dict[str, Any] | None, source: Path) -> None:
    for path, params in (fp or {}).get("modules", {}).items():
        try:
            module = get_module(model, path)
        except AttributeError:
            raise DeltaFileError(
                f"{source} was saved for a model with module {path!r}, which this model lacks; "
                "load it on the base model it was trained for"
            ) from None
        base = module.base if hasattr(module, "base") else module
        for pname, shape in params.items():
            have = getattr(base, pname, None)
            if have is None or list(have.shape) != list(shape):
                got = None if have is None else tuple(have.shape)
                raise DeltaFileError(
                    f"{source} is for another base model: {path}.{pname} is {got} here but "
                    f"{tuple(shape)} in the file; load it on the model it was trained for"
                )


def save_adapter(
    model: nn.Module, path: str | Path, name: str | None = None, format: str = "deltatune"
) -> Path:
    """Write delta ``name`` to directory ``path`` (``format="deltatune"`` or ``"peft"``). A new
    directory is written whole under a temporary name and renamed into place; into an existing one,
    atomic per file (the config, holding the tensors' checksum, last)."""
    name = _pick_name(model, name)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DeltaFileError(f"{path} exists and is not a directory; choose a directory path")
    if not path.exists() and format in ("deltatune", "peft"):
        # a crash then leaves no directory or a whole adapter, never tensors without their config
        import shutil

        from .outdir import staging_dir, swap_in

        tmp = staging_dir(path)
        try:
            save_adapter(model, tmp, name, format)
            swap_in(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path
    _check_finite(model, name)  # after staging: a new directory comes back through this call
    if format == "peft":
        from .peft import save_peft

        save_peft(model, path, name)
        return path
    if format != "deltatune":
        raise DeltaFileError(f"unknown format {format!r}; use 'deltatune' or 'peft'")
    spec = get_spec(model, name)
    deltas, copies = parts_of(model, name)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in [*deltas.items(), *copies.items()]:
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "method": spec.method,
        "spec": spec.to_dict(),
        "hosts": sorted(deltas),
        "trainable_modules": sorted(copies),
        "fingerprint": fingerprint(model, [*deltas, *copies]),
        "num_tensors": len(tensors),
        "num_parameters": int(sum(t.numel() for t in tensors.values())),
    }
    save_tensors(path / DELTA_TENSORS, tensors, metadata={"format": FORMAT, "name": name})
    config["checksums"] = {DELTA_TENSORS: file_sha256(path / DELTA_TENSORS)}  # of the bytes on disk
    write_json(path / DELTA_JSON, config)
    return path


def _check_finite(model: nn.Module, name: str) -> None:
    """A delta with NaN/inf values is never saved: it would load (and evaluate) as a broken
    model."""
    deltas, copies = parts_of(model, name)
    for prefix, module in [*deltas.items(), *copies.items()]:
        for key, value in module.state_dict().items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise StateError(
                    f"delta {name!r} holds NaN or inf values in {prefix}.{key}; nothing was saved "
                    "(training diverged: lower the learning rate, or check the data)"
                )


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if (path / DELTA_JSON).is_file():
        return "deltatune"
    if (path / PEFT_JSON).is_file():
        return "peft"
    if not path.exists():
        raise DeltaFileError(
            f"{path} does not exist; pass the directory written by dt.save_adapter or peft"
        )
    raise DeltaFileError(
        f"{path} holds neither {DELTA_JSON} nor {PEFT_JSON}; pass a saved delta directory"
    )


def read_delta_config(path: Path) -> dict[str, Any]:
    """``path/delta.json``, its whole structure checked (one-line errors naming the file and the
    field)."""
    file = path / DELTA_JSON
    config = read_json(file)
    validate_delta_config(config, file, format=FORMAT, max_version=FORMAT_VERSION)
    return config


def spec_of_config(config: dict[str, Any], file: Path) -> DeltaSpec:
    """The spec recorded in a validated config; a bad option names the file and the field."""
    try:
        return spec_from_dict(config["spec"])
    except DeltaFileError:
        raise
    except ValueError as exc:  # SpecError and friends: the message names the option
        raise DeltaFileError(
            f"{file}: field 'spec' is invalid: {exc}; save the delta again"
        ) from None


def verify_adapter(path: str | Path) -> None:
    """Compare a delta directory's tensor file with the sha256 recorded when it was saved (no-op for
    directories saved without one: older deltatune, peft itself, ``deltatune compress`` output)."""
    path = Path(path)
    if detect_format(path) == "deltatune":
        config = read_delta_config(path)
        if not config.get("compressed"):
            verify_file(
                path / DELTA_TENSORS,
                (config.get("checksums") or {}).get(DELTA_TENSORS),
                path / DELTA_JSON,
            )
    else:
        from .checks import PEFT_CHECKSUMS, peft_checksums

        verify_file(
            path / PEFT_TENSORS, peft_checksums(path).get(PEFT_TENSORS), path / PEFT_CHECKSUMS
        )


def read_adapter_info(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """What a delta directory holds (format, method, targets, sizes, fingerprint), without a model.

    The config's structure is checked and, with ``verify``, the tensor file against its recorded
    sha256."""
    path = Path(path)
    fmt = detect_format(path)
    keys = ("name", "method", "spec", "hosts", "trainable_modules", "fingerprint", "format_version")
    if fmt == "deltatune":
        config = read_delta_config(path)
    else:
        from .checks import validate_peft_config

        config = read_json(path / PEFT_JSON)
        validate_peft_config(config, path / PEFT_JSON)
    if verify:
        verify_adapter(path)
    tensor_file = path / (DELTA_TENSORS if fmt == "deltatune" else PEFT_TENSORS)
    if fmt == "deltatune" and config.get("compressed"):
        from .packed import packed_reader

        return {**packed_reader(path, config).describe(path), **{k: config.get(k) for k in keys}}
    header = tensor_header(tensor_file)
    info: dict[str, Any] = {
        "path": str(path),
        "format": fmt,
        "file_bytes": tensor_file.stat().st_size,
        "num_tensors": len(header),
        "num_parameters": sum(_prod(s) for _, s in header.values()),
        "metadata": _metadata(tensor_file),
    }
    if fmt == "deltatune":
        info.update({k: config.get(k) for k in keys})
        info["checksum"] = "recorded" if config.get("checksums") else "none recorded"
    else:
        from .checks import peft_checksums

        info.update(
            {
                "method": str(config.get("peft_type", "?")).lower(),
                "spec": config,
                "hosts": None,
                "checksum": "recorded" if peft_checksums(path) else "none recorded",
            }
        )
    if verify and info["checksum"] == "recorded":
        info["checksum"] = "verified"
    return info


def _metadata(file: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:  # the header was read once already: it parses
        return fh.metadata() or {}


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def load_adapter(
    model: nn.Module,
    path: str | Path,
    name: str | None = None,
    *,
    activate: bool = True,
    verify: bool = True,
) -> str:
    """Load a saved delta (format detected) into ``model`` as ``name``; returns the name used.

    Everything is checked before the model changes, and sizes before anything is allocated: the
    config's structure, the tensor file's sha256 (``verify=False`` skips it, for hand-edited files),
    the spec's sizes against the layers, the header's tensor names, shapes and dtypes against what
    the spec builds, then the values (finite, of the right kind). On any failure the model is left
    as it was.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "peft":
        from .peft import load_peft

        return load_peft(model, path, name or "default", activate=activate, verify=verify)
    config = read_delta_config(path)
    check_fingerprint(model, config.get("fingerprint"), path)
    spec = spec_of_config(config, path / DELTA_JSON)
    tensor_file = path / DELTA_TENSORS
    header = None
    if not config.get("compressed"):
        header = tensor_header(tensor_file)  # first: a truncated file is named as such
        if verify:
            verify_file(
                tensor_file, (config.get("checksums") or {}).get(DELTA_TENSORS), path / DELTA_JSON
            )
    name = name or config.get("name") or "default"
    if name in delta_names(model):
        raise StateError(
            f"a delta named {name!r} is already attached; pass another name= or detach it first"
        )
    attach_from_file(model, spec, name, path / DELTA_JSON, activate=activate)
    try:
        deltas, copies = parts_of(model, name)
        if sorted(deltas) != sorted(config["hosts"]) or sorted(copies) != sorted(
            config.get("trainable_modules", [])
        ):
            raise DeltaFileError(
                f"{path}: its spec selects different modules on this model than it was saved from; "
                "load it on the original base"
            )
        modules = {**deltas, **copies}
        if header is not None:  # names, shapes, dtypes: before the file's data is read
            check_header(
                tensor_file,
                header,
                {f"{p}.{k}": v for p, m in modules.items() for k, v in m.state_dict().items()},
            )
            tensors = load_tensors(tensor_file)
        else:  # written by `deltatune compress`: decoded by the reader it registered
            from .packed import packed_reader

            tensors = packed_reader(path, config).tensors(path)
        load_module_states(path, modules, tensors)
        for hp, delta in deltas.items():
            if hasattr(delta, "after_load"):
                delta.after_load(get_module(model, hp))
    except Exception:
        detach(model, name)
        raise
    return name


def attach_from_file(
    model: nn.Module, spec: DeltaSpec, name: str, file: Path, *, activate: bool
) -> None:
    """``attach`` for a spec read from ``file``: a size that does not fit a layer (checked before
    any tensor is allocated) names the file, since the fix is there."""
    try:
        attach(model, spec, name, activate=activate)
    except SpecError as exc:
        raise DeltaFileError(
            f"{file}: field 'spec' is invalid: {exc}; the file was edited or is for another model"
        ) from None


def load_module_states(
    source: Path, modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor]
) -> None:
    """Load ``<prefix>.<key>`` tensors into each module strictly; clear errors on any mismatch."""
    expected = {
        f"{p}.{k}": (m, k, v) for p, m in modules.items() for k, v in m.state_dict().items()
    }
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise DeltaFileError(
            f"{source}: tensors do not match the delta ({what}); the file is for another model or "
            "method"
        )
    per_module: dict[int, dict[str, torch.Tensor]] = {}
    for key, (module, local, current) in expected.items():
        value = tensors[key]
        if tuple(value.shape) != tuple(current.shape):
            raise DeltaFileError(
                f"{source}: tensor {key} has shape {tuple(value.shape)} but the model needs "
                f"{tuple(current.shape)}; it was saved for another base model or rank"
            )
        check_value(source, key, value, current)
        value = value.to(device=current.device, dtype=current.dtype)
        if (
            value.is_floating_point() and not torch.isfinite(value).all()
        ):  # e.g. float64 beyond float32's range
            raise DeltaFileError(
                f"{source}: tensor {key} overflows {current.dtype} when loaded; the delta is "
                "corrupt"
            )
        per_module.setdefault(id(module), {})[local] = value
    for module in modules.values():
        module.load_state_dict(per_module.get(id(module), {}), strict=True)
