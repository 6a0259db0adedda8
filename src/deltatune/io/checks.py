"""Checks on saved delta files before anything is built from them.

- **Integrity**: the sha256 of each tensor file, recorded when saving and compared when loading, so
  flipped bytes (a bad copy, a truncated download) are refused instead of loading as silently wrong
  weights. deltatune's layout records it in ``delta.json`` (``"checksums"``); peft's layout keeps
  ``adapter_config.json`` exactly as peft writes it and records it in a side file
  :data:`PEFT_CHECKSUMS` that peft ignores. Directories written without one (older deltatune, peft
  itself) load unverified. ``verify=False`` (CLI ``--no-verify``) skips the comparison, for files
  edited on purpose.
- **Structure**: every field of ``delta.json`` / ``adapter_config.json`` that deltatune reads has
  its type checked first, so a malformed file gives one line naming the file and the field, never a
  ``KeyError`` or ``TypeError`` from deep inside.
- **Tensors**: names, shapes and dtypes from the safetensors header (read without loading the data)
  against what the spec built; values must be finite and of the expected kind (no integer tensor is
  cast into a float parameter).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ..core.errors import DeltaFileError

PEFT_CHECKSUMS = "adapter_checksums.json"
CHECKSUM_FORMAT = "deltatune-checksums"
#: largest |value| accepted in a delta tensor: far above any trained weight, and small enough that a
#: product of two such values stays finite in float32 (values ×1e30 otherwise load and give NaN
#: losses)
MAX_ABS_VALUE = 1e15


# -- integrity -----------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (memory stays flat for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: Path, expected: str | None, recorded_in: Path) -> None:
    """Raise if ``path``'s sha256 differs from ``expected`` (``None``: nothing recorded, nothing
    checked)."""
    if expected is None or not path.is_file():
        return  # a missing file gets its own error from the reader
    if file_sha256(path) != expected:
        raise DeltaFileError(
            f"{path} does not match the sha256 recorded in {recorded_in}: the file changed after "
            "saving (corrupt copy or edited); copy or save it again, or load with verify=False "
            "(CLI: --no-verify) if you edited it on purpose"
        )


def peft_checksums(path: Path) -> dict[str, str]:
    """The side file of a peft-layout directory written by deltatune (``{}`` when there is none)."""
    side = path / PEFT_CHECKSUMS
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeltaFileError(
            f"{side} is not valid JSON ({exc}); delete it (it only holds checksums) or save again"
        ) from None
    sums = data.get("checksums") if isinstance(data, dict) else None
    _check_checksums(sums, side, "checksums")
    return sums


def _check_checksums(sums: Any, file: Path, field: str) -> None:
    if not isinstance(sums, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in sums.items()
    ):
        _bad(file, field, "must map tensor file names to sha256 hex strings")


# -- structure -------------------------------------------------------------------------------------
def _bad(file: Path, field: str, problem: str) -> None:
    raise DeltaFileError(
        f"{file}: field {field!r} {problem}; the file is corrupt or was edited by hand: save the "
        "delta again"
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def validate_delta_config(
    config: dict[str, Any], file: Path, *, format: str, max_version: int
) -> None:
    """Check every field of a ``delta.json`` that loading reads (types and nesting), or raise one
    line."""
    if config.get("format") != format:
        raise DeltaFileError(
            f"{file} is not a deltatune delta config (format={config.get('format')!r}); "
            "pass a directory written by dt.save_adapter"
        )
    version = config.get("format_version")
    if not _is_int(version) or version < 1:
        _bad(file, "format_version", f"must be a positive integer, not {version!r}")
    if version > max_version:
        raise DeltaFileError(
            f"{file.parent} was written by a newer deltatune (format version {version} > "
            f"{max_version}); upgrade deltatune to load it"
        )
    spec = config.get("spec")
    if not isinstance(spec, dict):
        _bad(
            file,
            "spec",
            "is missing" if spec is None else f"must be an object, not {type(spec).__name__}",
        )
    if not isinstance(spec.get("method"), str):
        _bad(file, "spec.method", "must be a method name")
    if config.get("method") is not None and config.get("method") != spec["method"]:
        _bad(file, "method", f"({config['method']!r}) contradicts spec.method ({spec['method']!r})")
    if config.get("name") is not None and not isinstance(config["name"], str):
        _bad(file, "name", "must be a string")
    for field in ("hosts", "trainable_modules"):
        if field in config and not _is_str_list(config[field]):
            _bad(file, field, "must be a list of module paths")
    if "hosts" not in config:
        _bad(file, "hosts", "is missing")
    fp = config.get("fingerprint")
    if fp is not None:
        if not isinstance(fp, dict) or not isinstance(fp.get("modules", {}), dict):
            _bad(file, "fingerprint", "must be an object with a 'modules' object")
        for path, params in fp.get("modules", {}).items():
            if not isinstance(params, dict) or not all(
                isinstance(s, list) and all(_is_int(d) and d >= 0 for d in s)
                for s in params.values()
            ):
                _bad(
                    file,
                    f"fingerprint.modules.{path}",
                    "must map parameter names to shapes (lists of sizes)",
                )
    for field in ("num_tensors", "num_parameters"):
        if field in config and not (_is_int(config[field]) and config[field] >= 0):
            _bad(file, field, "must be a non-negative integer")
    if "checksums" in config:
        _check_checksums(config["checksums"], file, "checksums")
    if "compressed" in config and not isinstance(config["compressed"], (dict, bool)):
        _bad(file, "compressed", "must be an object")


#: types of the peft config fields deltatune reads (all optional; ``None`` allowed where peft writes
#: it)
_PEFT_FIELDS: dict[str, tuple[str, bool]] = {
    **{
        k: ("int", False)
        for k in (
            "r",
            "init_r",
            "target_r",
            "tinit",
            "tfinal",
            "deltaT",
            "num_virtual_tokens",
            "oft_block_size",
            "boft_block_size",
            "boft_block_num",
            "boft_n_butterfly_factor",
            "num_cayley_neumann_terms",
            "projection_prng_key",
        )
    },
    **{k: ("int", True) for k in ("total_step", "num_transformer_submodules")},
    **{
        k: ("number", False)
        for k in (
            "lora_alpha",
            "lora_dropout",
            "beta1",
            "beta2",
            "orth_reg_weight",
            "d_initial",
            "vera_dropout",
            "eps",
            "module_dropout",
            "boft_dropout",
        )
    },
    **{
        k: ("bool", False)
        for k in (
            "use_dora",
            "use_rslora",
            "fan_in_fan_out",
            "save_projection",
            "block_share",
            "use_cayley_neumann",
            "coft",
        )
    },
    "bias": ("str", False),
    "task_type": ("str", True),
    **{k: ("names", True) for k in ("target_modules", "modules_to_save", "feedforward_modules")},
    **{k: ("dict", True) for k in ("rank_pattern", "alpha_pattern")},
}
_CHECK = {
    "int": _is_int,
    "number": _is_num,
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "names": lambda v: isinstance(v, str) or _is_str_list(v),
    "dict": lambda v: isinstance(v, dict),
}
_WHAT = {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string",
         "names": "a module name or a list of them", "dict": "an object"}


def validate_peft_config(config: dict[str, Any], file: Path) -> None:
    """Check the fields of a peft ``adapter_config.json`` that deltatune reads, or raise one
    line."""
    if not isinstance(config.get("peft_type"), str):
        _bad(
            file,
            "peft_type",
            "is missing" if "peft_type" not in config else "must be a string such as 'LORA'",
        )
    for field, (kind, nullable) in _PEFT_FIELDS.items():
        if field not in config or (nullable and config[field] is None):
            continue
        if not _CHECK[kind](config[field]):
            _bad(file, field, f"must be {_WHAT[kind]}, not {config[field]!r}"[:200])
    for field in ("rank_pattern", "alpha_pattern"):
        for key, value in (config.get(field) or {}).items():
            # AdaLoRA's rank_pattern holds each layer's kept-rank mask (a list of booleans)
            mask = (
                field == "rank_pattern"
                and isinstance(value, list)
                and all(isinstance(v, bool) for v in value)
            )
            if not (mask or (_is_int(value) if field == "rank_pattern" else _is_num(value))):
                what = "a rank or a list of true/false" if field == "rank_pattern" else "a number"
                _bad(file, f"{field}.{key}", f"must be {what}, not {value!r}"[:200])


# -- tensors ---------------------------------------------------------------------------------------
def tensor_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (safetensors dtype, shape)}`` from the file's header; the tensor data is not
    read."""
    from safetensors import safe_open

    if not file.is_file():
        raise DeltaFileError(f"{file} does not exist; save the delta first or check the path")
    try:
        with safe_open(str(file), framework="pt") as fh:
            return {
                k: (fh.get_slice(k).get_dtype(), tuple(fh.get_slice(k).get_shape()))
                for k in fh.keys()
            }
    except Exception as exc:  # noqa: BLE001 - any reader failure means a corrupt header
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DeltaFileError(
            f"{file} is not a readable safetensors file ({first}); it is corrupt or truncated: "
            "save or copy it again"
        ) from None


def _kind_of_header_dtype(dtype: str) -> str:
    if dtype == "BOOL":
        return "bool"
    return "float" if dtype.startswith("F") or dtype == "BF16" else "int"


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point or dtype.is_complex else "int"


def check_header(file: Path, header: Mapping[str, tuple[str, tuple[int, ...]]],
                 expected: Mapping[str, torch.Tensor]) -> None:
    """Names, shapes and dtype kinds of the file's tensors against the state the spec built."""
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise DeltaFileError(
            f"{file}: tensors do not match the delta ({what}); the file is for another model or "
            "method"
        )
    for key, (dtype, shape) in header.items():
        want = expected[key]
        if tuple(shape) != tuple(want.shape):
            raise DeltaFileError(
                f"{file}: tensor {key} has shape {tuple(shape)} but the spec builds "
                f"{tuple(want.shape)}; the file and its config disagree (edited or for another "
                "base model or rank)"
            )
        if _kind_of_header_dtype(dtype) != _kind(want.dtype):
            raise DeltaFileError(
                f"{file}: tensor {key} is {dtype} but must be "
                f"{str(want.dtype).removeprefix('torch.')}; the file is corrupt or was edited: "
                "save the delta again"
            )


def check_value(source: Path, key: str, value: torch.Tensor, want: torch.Tensor) -> None:
    """A loaded tensor must be of the expected kind (never cast int→float), finite and of sane
    size."""
    if _kind(value.dtype) != _kind(want.dtype):
        raise DeltaFileError(
            f"{source}: tensor {key} is {str(value.dtype).removeprefix('torch.')} but must be "
            f"{str(want.dtype).removeprefix('torch.')}; the file is corrupt or was edited: save "
            "the delta again"
        )
    if value.is_floating_point() and value.numel():
        if not torch.isfinite(value).all():
            raise DeltaFileError(
                f"{source}: tensor {key} holds NaN or inf values; the delta is corrupt: save it "
                "again"
            )
        biggest = float(value.abs().max())
        if biggest > MAX_ABS_VALUE:
            raise DeltaFileError(
                f"{source}: tensor {key} holds values up to {biggest:.3g} (more than "
                f"{MAX_ABS_VALUE:.0e}), which overflow to NaN in the forward pass; the delta is "
                "corrupt: save it again"
            )
