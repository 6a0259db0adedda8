"""Saving and loading deltas: deltatune's own directory format, and peft's (via :mod:`.peft`).

deltatune format — a directory with
  ``delta.safetensors``  only the delta's tensors, keys ``<module path>.<tensor>``;
  ``delta.json``         format + version, the spec, and the base-model fingerprint (the shapes of
                         every hosting module's parameters), so a delta is never silently loaded onto
                         another base.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import DeltaFileError, StateError
from ..core.host import DeltaHost, ModuleCopy, get_module, iter_hosts
from ..core.model import attach, delta_names, detach, get_spec
from ..core.spec import spec_from_dict
from .files import load_tensors, read_json, save_tensors, write_json

FORMAT = "deltatune-delta"
FORMAT_VERSION = 1
DELTA_JSON, DELTA_TENSORS = "delta.json", "delta.safetensors"
PEFT_JSON, PEFT_TENSORS = "adapter_config.json", "adapter_model.safetensors"


def _pick_name(model: nn.Module, name: str | None) -> str:
    names = delta_names(model)
    if name is None:
        if len(names) != 1:
            raise StateError(f"the model holds deltas {names or 'none'}; pass name=... to choose which one")
        return names[0]
    if name not in names:
        raise StateError(f"no delta named {name!r} is attached; attached: {', '.join(names) or 'none'}")
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


def check_fingerprint(model: nn.Module, fp: dict[str, Any], source: Path) -> None:
    for path, params in fp.get("modules", {}).items():
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
                    f"{source} is for another base model: {path}.{pname} is {got} here but {tuple(shape)} "
                    "in the file; load it on the model it was trained for"
                )


def save_adapter(model: nn.Module, path: str | Path, name: str | None = None, format: str = "deltatune") -> Path:
    """Write delta ``name`` to directory ``path`` (``format="deltatune"`` or ``"peft"``); atomic per file."""
    name = _pick_name(model, name)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DeltaFileError(f"{path} exists and is not a directory; choose a directory path")
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
    write_json(path / DELTA_JSON, config)
    return path


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if (path / DELTA_JSON).is_file():
        return "deltatune"
    if (path / PEFT_JSON).is_file():
        return "peft"
    if not path.exists():
        raise DeltaFileError(f"{path} does not exist; pass the directory written by dt.save_adapter or peft")
    raise DeltaFileError(f"{path} holds neither {DELTA_JSON} nor {PEFT_JSON}; pass a saved delta directory")


def read_adapter_info(path: str | Path) -> dict[str, Any]:
    """What a delta directory holds (format, method, targets, sizes, fingerprint), without a model."""
    path = Path(path)
    fmt = detect_format(path)
    config = read_json(path / (DELTA_JSON if fmt == "deltatune" else PEFT_JSON))
    tensor_file = path / (DELTA_TENSORS if fmt == "deltatune" else PEFT_TENSORS)
    if fmt == "deltatune" and config.get("compressed"):
        from ..compress.container import describe

        return {**describe(path), "name": config.get("name"), "method": config.get("method"), "spec": config.get("spec"),
                "hosts": config.get("hosts"), "trainable_modules": config.get("trainable_modules"),
                "fingerprint": config.get("fingerprint"), "format_version": config.get("format_version")}
    from safetensors import safe_open

    sizes: dict[str, Any] = {"file_bytes": tensor_file.stat().st_size if tensor_file.exists() else None}
    try:
        with safe_open(str(tensor_file), framework="pt") as fh:
            keys = list(fh.keys())
            sizes["num_tensors"] = len(keys)
            sizes["num_parameters"] = sum(_prod(fh.get_slice(k).get_shape()) for k in keys)
            sizes["metadata"] = fh.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - any reader failure is a corrupt file here
        raise DeltaFileError(f"{tensor_file} is not a readable safetensors file ({exc}); save it again") from exc
    info = {"path": str(path), "format": fmt, **sizes}
    if fmt == "deltatune":
        info.update({k: config.get(k) for k in ("name", "method", "spec", "hosts", "trainable_modules", "fingerprint", "format_version")})
    else:
        info.update({"method": str(config.get("peft_type", "?")).lower(), "spec": config, "hosts": None})
    return info


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def load_adapter(model: nn.Module, path: str | Path, name: str | None = None, *, activate: bool = True) -> str:
    """Load a saved delta (format detected) into ``model`` as ``name``; returns the name used.

    Everything is checked before the model changes; on any failure the model is left as it was.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "peft":
        from .peft import load_peft

        return load_peft(model, path, name or "default", activate=activate)
    config = read_json(path / DELTA_JSON)
    if config.get("format") != FORMAT:
        raise DeltaFileError(f"{path / DELTA_JSON} is not a deltatune delta config (format={config.get('format')!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DeltaFileError(
            f"{path} was written by a newer deltatune (format version {version} > {FORMAT_VERSION}); upgrade deltatune to load it"
        )
    check_fingerprint(model, config.get("fingerprint", {}), path)
    if config.get("compressed"):  # written by `deltatune compress`: decode the packed tensors
        from ..compress.container import read_adapter_tensors

        tensors = read_adapter_tensors(path)
    else:
        tensors = load_tensors(path / DELTA_TENSORS)
    spec = spec_from_dict(config["spec"])
    name = name or config.get("name") or "default"
    if name in delta_names(model):
        raise StateError(f"a delta named {name!r} is already attached; pass another name= or detach it first")
    attach(model, spec, name, activate=activate)
    try:
        deltas, copies = parts_of(model, name)
        if sorted(deltas) != sorted(config.get("hosts", [])) or sorted(copies) != sorted(config.get("trainable_modules", [])):
            raise DeltaFileError(f"{path}: its spec selects different modules on this model than it was saved from; load it on the original base")
        load_module_states(path, {**deltas, **copies}, tensors)
        for hp, delta in deltas.items():
            if hasattr(delta, "after_load"):
                delta.after_load(get_module(model, hp))
    except Exception:
        detach(model, name)
        raise
    return name


def load_module_states(source: Path, modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """Load ``<prefix>.<key>`` tensors into each module strictly; clear errors on any mismatch."""
    expected = {f"{p}.{k}": (m, k, v) for p, m in modules.items() for k, v in m.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise DeltaFileError(f"{source}: tensors do not match the delta ({what}); the file is for another model or method")
    per_module: dict[int, dict[str, torch.Tensor]] = {}
    for key, (module, local, current) in expected.items():
        value = tensors[key]
        if tuple(value.shape) != tuple(current.shape):
            raise DeltaFileError(
                f"{source}: tensor {key} has shape {tuple(value.shape)} but the model needs {tuple(current.shape)}; "
                "it was saved for another base model or rank"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise DeltaFileError(f"{source}: tensor {key} holds NaN or inf values; the delta is corrupt")
        per_module.setdefault(id(module), {})[local] = value.to(device=current.device, dtype=current.dtype)
    for module in modules.values():
        module.load_state_dict(per_module.get(id(module), {}), strict=True)
