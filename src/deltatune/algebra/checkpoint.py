"""Checkpoints on disk, read lazily, and a sharding writer that streams tensors to disk.

A checkpoint is one ``.safetensors`` file or a directory of them: shards listed by a
``model.safetensors.index.json`` ``weight_map`` (the transformers layout), or a single
``model.safetensors``, or any set of ``*.safetensors`` files. Only headers are read up front; tensor
rows are read on demand, each read opening the file afresh, so no memory map (and none of its
resident pages) outlives the read. Pickled checkpoints are refused, never loaded.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Sequence

import torch

from ..io.files import write_json
from .errors import CheckpointError, MergeError
from .tensors import n_rows

INDEX = "model.safetensors.index.json"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
#: small files copied beside merged weights so the output directory loads like its inputs
METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


def dtype_from_name(name: str) -> torch.dtype:
    """``"float32"``, ``"bfloat16"``, ``"fp16"``... → torch dtype (a one-line error otherwise)."""
    aliases = {
        "fp32": "float32",
        "fp16": "float16",
        "half": "float16",
        "bf16": "bfloat16",
        "float": "float32",
        "fp64": "float64",
    }
    key = aliases.get(str(name).lower(), str(name).lower())
    dtype = getattr(torch, key, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise MergeError(
            f"dtype {name!r} is not a floating type; use float32, float16, bfloat16 or float64"
        )
    return dtype


class Checkpoint:
    """Lazy view of a checkpoint's tensors (names, shapes, dtypes from the headers only)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.root = _root(self.path)
        files = self._files()
        self._where: dict[str, tuple[Path, tuple[int, ...], torch.dtype]] = {}
        for file, wanted in files.items():
            for name, shape, dtype in _read_header(file):
                if wanted is not None and name not in wanted:
                    continue
                if name in self._where:
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} appears in two shards; the checkpoint is "
                        "inconsistent"
                    )
                self._where[name] = (file, shape, dtype)
        expected = {n for w in files.values() if w is not None for n in w}
        missing = sorted(expected - set(self._where))
        if missing:
            raise CheckpointError(
                f"{self.path}: the index lists {missing[0]!r} but its shard does not hold it; the "
                "checkpoint is incomplete"
            )
        if not self._where:
            raise CheckpointError(f"{self.path} holds no tensors; point to a model checkpoint")

    def _files(self) -> dict[Path, set[str] | None]:
        p = self.path
        if not p.exists():
            raise CheckpointError(
                f"{p} does not exist; pass a .safetensors file or a model directory"
            )
        if p.is_file():
            if p.suffix != ".safetensors":
                raise CheckpointError(
                    f"{p} is not a .safetensors file; deltatune never unpickles checkpoints: "
                    "convert it to safetensors"
                )
            return {p: None}
        if (p / INDEX).is_file():
            from ..io.files import read_json

            self._inside(p / INDEX)
            try:
                index = read_json(p / INDEX)
            except ValueError as exc:
                raise CheckpointError(str(exc)) from None
            wmap = index.get("weight_map")
            if not isinstance(wmap, dict) or not wmap:
                raise CheckpointError(f"{p / INDEX} has no weight_map; the index is corrupt")
            files: dict[Path, set[str] | None] = {}
            for name, fname in wmap.items():
                files.setdefault(self._inside(p / str(fname)), set()).add(name)
            for f in files:
                if not f.is_file():
                    raise CheckpointError(
                        f"{p / INDEX} lists shard {f.name} but it is missing; copy the checkpoint "
                        "again"
                    )
            return files
        if (p / "model.safetensors").is_file():
            return {self._inside(p / "model.safetensors"): None}
        shards = sorted(p.glob("*.safetensors"))
        if shards:
            return {self._inside(f): None for f in shards}
        pickles = sorted(
            f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")
        )
        if pickles:
            raise CheckpointError(
                f"{p} holds only pickled weights ({pickles[0]}); deltatune never unpickles: save "
                "the model with safetensors"
            )
        raise CheckpointError(f"{p} holds no .safetensors files; pass a model directory or file")

    def _inside(self, path: Path) -> Path:
        """``path`` with its links resolved, refused when that leaves the checkpoint's directory: a
        linked shard or tokenizer file would read (and copy into the output) a file from
        elsewhere."""
        real = path.resolve()
        if real != self.root and self.root not in real.parents:
            raise CheckpointError(
                f"{path} resolves to {real}, outside the model directory {self.root}; "
                "keep a checkpoint's files inside its directory (copy them, do not link them)"
            )
        return real

    def side_files(self) -> dict[str, Path]:
        """The config and tokenizer files beside a directory checkpoint (name → real path), which a
        merge copies into its output; one that links out of the directory is refused."""
        if not self.path.is_dir():
            return {}
        found = {}
        for fname in METADATA_FILES:
            src = self.path / fname
            if src.is_symlink() or src.exists():
                real = self._inside(src)
                if real.is_file():
                    found[fname] = real
        return found

    # -- what is inside -----------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._where[name][2]

    def file_of(self, name: str) -> Path:
        return self._where[name][0]

    @property
    def files(self) -> list[Path]:
        return sorted({f for f, _, _ in self._where.values()})

    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def source(self, name: str, dtype: torch.dtype | None = None) -> "LazyTensor":
        if name not in self._where:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        return LazyTensor(self, name, dtype)

    def load(self, name: str) -> torch.Tensor:
        """The whole tensor (NaN/inf checked)."""
        src = self.source(name)
        return src.rows(0, n_rows(src.shape)).reshape(src.shape).clone()

    def load_all(self) -> dict[str, torch.Tensor]:
        return {n: self.load(n) for n in self._where}


class LazyTensor:
    """One tensor of a checkpoint, read a block of rows at a time (a
    :class:`~.tensors.TensorSource`)."""

    def __init__(self, ckpt: Checkpoint, name: str, dtype: torch.dtype | None = None) -> None:
        self.ckpt, self.name = ckpt, name
        file, shape, stored = ckpt._where[name]
        self.file = file
        self.shape = torch.Size(shape)
        self.stored_dtype = stored
        self.dtype = dtype or stored
        self._checked: set[tuple[int, int]] = set()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.file), framework="pt") as fh:
                if len(self.shape) == 0:
                    part = fh.get_tensor(self.name).reshape(1)[start:stop]
                else:
                    part = fh.get_slice(self.name)[start:stop]
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(
                f"{self.file}: cannot read {self.name} ({str(exc).splitlines()[0]}); the file is "
                "corrupt or truncated"
            ) from exc
        if part.is_floating_point() and (start, stop) not in self._checked:
            # one reduction: NaN/inf make the sum non-finite (an overflowing sum is re-checked
            # exactly)
            if not bool(torch.isfinite(part.sum())) and not bool(torch.isfinite(part).all()):
                raise CheckpointError(
                    f"{self.file}: tensor {self.name} holds NaN or inf values; the checkpoint is "
                    "corrupt, fix or re-save it"
                )
            self._checked.add((start, stop))
        return part if part.dtype == self.dtype else part.to(self.dtype)


def _root(path: Path) -> Path:
    """The directory a checkpoint's files must lie in (links resolved). In the Hugging Face cache a
    snapshot's files link to ``../../blobs/``, so there it is the repository folder holding both."""
    real = path.resolve()
    root = real if real.is_dir() else real.parent
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        return root.parent.parent
    return root


def _read_header(file: Path) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as fh:
            out = []
            for name in fh.keys():
                sl = fh.get_slice(name)
                code = sl.get_dtype()
                if code not in _DTYPES:
                    raise CheckpointError(
                        f"{file}: tensor {name} has dtype {code}, which deltatune cannot merge"
                    )
                out.append((name, tuple(int(s) for s in sl.get_shape()), _DTYPES[code]))
            return out
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({str(exc).splitlines()[0]}); it is "
            "corrupt or truncated"
        ) from exc


# -- writing --------------------------------------------------------------------------------------
class ShardWriter:
    """Writes a planned list of tensors into safetensors shards, streaming each tensor's bytes.

    The plan (names, shapes, dtypes, in order) is known up front, so every shard's header is written
    before its data and no tensor has to be held whole. One shard → ``model.safetensors``; several →
    ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        plan: Sequence[tuple[str, Sequence[int], torch.dtype]],
        max_shard_bytes: int,
    ) -> None:
        self.directory = Path(directory)
        self.shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = _nbytes(shape, dtype)
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, tuple(int(s) for s in shape), dtype))
            size += nbytes
        n = len(self.shards)
        self.file_names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._order = [(s, t) for s, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._fh = None
        self._shard = -1
        self._remaining = 0

    def tensor(self, name: str) -> "ShardWriter":
        """Start the next planned tensor (must be ``name``); then :meth:`write` its rows in
        order."""
        if self._remaining:
            raise MergeError(f"tensor {self._order[self._next - 1][1][0]} was not fully written")
        shard, (planned, shape, dtype) = self._order[self._next]
        if planned != name:
            raise MergeError(f"writer expected tensor {planned!r} next, got {name!r}")
        if shard != self._shard:
            self._open(shard)
        self._dtype = dtype
        self._remaining = _nbytes(shape, dtype)
        self._next += 1
        return self

    def write(self, chunk: torch.Tensor) -> None:
        chunk = chunk.detach().to("cpu", self._dtype).contiguous()
        # one reduction: NaN/inf make the sum non-finite (an overflowing sum is re-checked exactly)
        if chunk.is_floating_point() and not bool(torch.isfinite(chunk.sum())) \
                and not bool(torch.isfinite(chunk).all()):
            raise MergeError(
                f"merged tensor {self._order[self._next - 1][1][0]} has NaN or inf values, so no "
                "output was written; check the weights and parameters (or use an out_dtype wide "
                "enough for the values)"
            )
        data = chunk.reshape(-1).view(torch.uint8)
        if data.numel() > self._remaining:
            raise MergeError("a merge method produced more data than its tensor holds")
        self._fh.write(data.numpy())
        self._remaining -= data.numel()

    def _open(self, shard: int) -> None:
        self._close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self.shards[shard]:
            n = _nbytes(shape, dtype)
            header[name] = {
                "dtype": _NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self._fh = open(self.directory / self.file_names[shard], "wb")
        self._fh.write(struct.pack("<Q", len(text)) + text)
        self._shard = shard

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def finish(self) -> dict[str, object]:
        """Close the last shard, write the index (several shards); returns a summary."""
        if self._remaining or self._next != len(self._order):
            raise MergeError("the merge ended before every planned tensor was written")
        self._close()
        total = sum(_nbytes(s, d) for shard in self.shards for _, s, d in shard)
        if len(self.shards) > 1:
            wmap = {
                name: self.file_names[i]
                for i, shard in enumerate(self.shards)
                for name, _, _ in shard
            }
            write_json(
                self.directory / INDEX, {"metadata": {"total_size": total}, "weight_map": wmap}
            )
        return {"shards": len(self.shards), "files": list(self.file_names), "total_bytes": total}

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * dtype.itemsize
