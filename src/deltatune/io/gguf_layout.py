"""GGUF layout shared by deltatune's GGUF writers and readers: which models are written and how
(llama.cpp's names, row order and hyper-parameters), and a fast reader of GGUF files.

gguf-py's ``GGUFReader`` builds a numpy view per string and takes seconds on a 49k-token vocabulary
(transformers' GGUF loader uses it: about 30 s for SmolLM2's file on 2 cores); :func:`read_gguf`
walks the same header in a fraction of one, for copying tokenizer keys and reading files back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import DeltaError

#: --quant names and the llama.cpp file type each one records (general.file_type)
QUANTS = {"f16": ("F16", 1), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2)}
#: transformers model_type -> GGUF architecture; llama.cpp runs Mistral as "llama" too
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}
#: names of the model file and the LoRA file deltatune writes into an export directory
MODEL_FILE = "model-{quant}.gguf"
LORA_FILE = "adapter-lora.gguf"


class GGUFExportError(DeltaError):
    """A model, adapter or option that cannot be written as GGUF (one line, names the fix)."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("GGUF export needs the gguf package; pip install gguf") from None
    return gguf


def _transformers_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside deltatune's wrapper (kept as ``lm``), or the model
    itself."""
    inner = getattr(model, "lm", model)
    config = getattr(inner, "config", None)
    if config is None or not hasattr(inner, "get_output_embeddings"):
        raise GGUFExportError(
            f"{type(model).__name__} is not a transformers causal language model; GGUF export "
            "writes causal LMs only (export a classifier with --format safetensors)"
        )
    return inner


def check_architecture(model: nn.Module) -> str:
    """The GGUF architecture ``model`` is written as; one-line refusal for anything else."""
    lm = _transformers_lm(model)
    config = lm.config
    mtype = getattr(config, "model_type", None)
    if mtype not in ARCHITECTURES:
        raise GGUFExportError(
            f"architecture {mtype!r} cannot be written as GGUF by deltatune (it writes "
            f"{', '.join(sorted(ARCHITECTURES))}); export it with --format safetensors and convert "
            "it with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else ""
    if rope_type not in ("default", None):
        raise GGUFExportError(
            f"rope scaling {rope_type!r} is not written by deltatune's GGUF export (plain RoPE "
            "only); export with --format safetensors and convert with llama.cpp"
        )
    return ARCHITECTURES[mtype]


def check_quant(quant: str) -> str:
    if quant not in QUANTS:
        raise GGUFExportError(f"unknown --quant {quant!r}; use one of {', '.join(QUANTS)}")
    return quant


def _hparams(config: Any) -> dict[str, Any]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return {
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "theta": float(theta),
    }


def _permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a query/key projection (out, ...) from transformers' rotary layout
    (per head: first half, second half) to llama.cpp's (per head: pairs of neighbours)."""
    out = w.shape[0]
    half = out // n_head // 2
    # (heads, 2, half, ...) -> (heads, half, 2, ...): row i of one half meets row i of the other
    return w.reshape(n_head, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`_permute_rows` (llama.cpp's layout back to transformers')."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _name_map(gguf: Any, arch: str, layers: int) -> Any:
    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), layers)


def _gguf_name(tmap: Any, name: str) -> str:
    mapped = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise GGUFExportError(
            f"tensor {name!r} has no GGUF name in llama.cpp's llama layout; the model is not a "
            "plain Llama (export with --format safetensors)"
        )
    return mapped


#: numpy type of each GGUF scalar value type (8 is a string, 9 an array)
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
            10: "<u8", 11: "<i8", 12: "<f8"}


@dataclass
class GGUFContents:
    """A GGUF file's key/values (``{key: (value type, item type or None, value)}``, strings as
    bytes) and tensor table (``{name: (GGML type, shape as torch sees it, offset)}``)."""

    path: Path
    fields: dict[str, tuple[int, int | None, Any]]
    tensors: dict[str, tuple[int, tuple[int, ...], int]]
    data_start: int

    def text(self, key: str) -> str | None:
        value = self.fields.get(key, (None, None, None))[2]
        return value.decode("utf-8") if isinstance(value, bytes) else value


def read_gguf(path: str | os.PathLike) -> GGUFContents:
    """Parse a GGUF file's header, key/values and tensor table (no tensor data). gguf-py's reader
    builds a numpy view per string and takes seconds on a 49k-token vocabulary; this walk takes a
    fraction of one. For files deltatune wrote or was given as GGUF (a corrupt one gives one
    line)."""
    import struct

    path = Path(path)
    raw = path.read_bytes()

    def string(at: int) -> tuple[bytes, int]:
        (n,) = struct.unpack_from("<Q", raw, at)
        if at + 8 + n > len(raw):
            raise IndexError
        return raw[at + 8 : at + 8 + n], at + 8 + n

    def value(kind: int, at: int) -> tuple[Any, int]:
        if kind in _SCALARS:
            dt = np.dtype(_SCALARS[kind])
            v = np.frombuffer(raw, dt, 1, at)[0].item()
            return (bool(v) if kind == 7 else v), at + dt.itemsize
        if kind == 8:
            return string(at)
        raise ValueError(f"value type {kind}")

    try:
        if raw[:4] != b"GGUF" or struct.unpack_from("<I", raw, 4)[0] not in (2, 3):
            raise ValueError("not a GGUF v2/v3 file")
        n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)
        at, fields = 24, {}
        for _ in range(n_kv):
            key, at = string(at)
            (kind,) = struct.unpack_from("<I", raw, at)
            at += 4
            if kind == 9:
                item, count = struct.unpack_from("<IQ", raw, at)
                at += 12
                if item in _SCALARS:
                    dt = np.dtype(_SCALARS[item])
                    arr = np.frombuffer(raw, dt, count, at)
                    items = [bool(x) for x in arr] if item == 7 else arr.tolist()
                    at += dt.itemsize * count
                else:
                    items = []
                    for _ in range(count):
                        v, at = value(item, at)
                        items.append(v)
                fields[key.decode("utf-8")] = (kind, item, items)
            else:
                v, at = value(kind, at)
                fields[key.decode("utf-8")] = (kind, None, v)
        tensors = {}
        for _ in range(n_tensors):
            name, at = string(at)
            (n_dims,) = struct.unpack_from("<I", raw, at)
            dims = struct.unpack_from(f"<{n_dims}Q", raw, at + 4)
            kind, offset = struct.unpack_from("<IQ", raw, at + 4 + 8 * n_dims)
            at += 16 + 8 * n_dims
            tensors[name.decode("utf-8")] = (kind, tuple(reversed(dims)), offset)
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
        raise GGUFExportError(
            f"{path} is not a readable GGUF file ({exc or type(exc).__name__}); copy it again"
        ) from None
    align = fields.get("general.alignment", (4, None, 32))[2]
    return GGUFContents(path, fields, tensors, -(-at // align) * align)


def read_gguf_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file dequantized to float32 (gguf-py's dequantizers), in GGUF names
    and llama.cpp's layout, shaped as torch sees it ((out, in)); for checks and tests."""
    gguf = _gguf()
    contents = read_gguf(path)
    raw = np.memmap(contents.path, dtype=np.uint8, mode="r")
    out = {}
    for name, (kind, shape, offset) in contents.tensors.items():
        qtype = gguf.GGMLQuantizationType(kind)
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        count = int(np.prod(shape)) // block * nbytes
        start = contents.data_start + offset
        data = np.asarray(raw[start : start + count])
        if qtype == gguf.GGMLQuantizationType.F32:
            values = data.view(np.float32)
        elif qtype == gguf.GGMLQuantizationType.F16:
            values = data.view(np.float16).astype(np.float32)
        else:
            values = gguf.quants.dequantize(data.reshape(-1, shape[-1] // block * nbytes), qtype)
        out[name] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
    return out
