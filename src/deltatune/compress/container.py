"""Compressed deltas on disk: ``compressed.json`` + ``compressed.safetensors`` (packed uint8/int
parts).

Two kinds of source, one container:

- a deltatune **adapter directory** (LoRA, IA3, any method): its own tensors are compressed and a
  copy of its ``delta.json`` (marked ``"compressed": true``) is written beside the container, so
  ``dt.load_adapter`` attaches the compressed delta like any other (decoding it on load);
- a **task vector** (a full fine-tuning delta: fine-tuned checkpoint − base, or a saved task
  vector): ``load_compressed(dir).to_task_vector()`` gives it back, ``.apply_to(model)`` adds it to
  a base.

Only floating tensors with at least 2 dimensions and ``min_numel`` entries go through the codec;
vectors (biases, norms, IA3 scales) and small tensors stay raw: they are a tiny share of the bytes
and the codecs' per-tensor scales would cost more than they save. Decoding is lazy, one tensor at a
time, from a memory-mapped file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from ..core.errors import DeltaFileError
from ..io.files import atomic_write, read_json, write_json
from ..io.packed import PackedReader, register_packed_reader
from .codecs import CODECS, SCALED, CompressError, check_options, decode

FORMAT, FORMAT_VERSION = "deltatune-compressed", 1
JSON_NAME, TENSOR_NAME = "compressed.json", "compressed.safetensors"
DELTA_JSON, DELTA_TENSORS = "delta.json", "delta.safetensors"
SEP = "::"  # <tensor name>::<part> keys in the safetensors file


@dataclass
class CompressedDelta:
    """Packed entries (``meta`` + parts per tensor); decode one with ``tensor(name)``."""

    codec: str
    options: dict[str, Any]
    metas: dict[str, dict[str, Any]]
    parts: dict[str, dict[str, torch.Tensor]]
    source: dict[str, Any] = field(
        default_factory=dict
    )  # kind, path, and the adapter config for adapters

    # -- reading --------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.metas)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.metas:
            raise CompressError(f"no tensor {name!r} in this compressed delta")
        return decode(self.metas[name], self.parts[name])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name) for name in self.metas}

    def __iter__(self) -> Iterator[str]:
        return iter(self.metas)

    def to_task_vector(self, *, factored: bool = True):
        """A :class:`~deltatune.algebra.TaskVector`; ``lowrank`` entries stay factored unless
        ``factored=False``."""
        from ..algebra import TaskVector
        from ..algebra.lowrank import LowRank

        entries: dict[str, Any] = {}
        for name, meta in self.metas.items():
            if factored and meta["codec"] == "lowrank":
                p = self.parts[name]
                entries[name] = LowRank(A=p["A"].float(), B=p["B"].float())
            else:
                entries[name] = self.tensor(name)
        return TaskVector(entries)

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def original_bytes(self) -> int:
        """Bytes of the same tensors stored uncompressed in float32 (raw tensors at their own
        size)."""
        return sum(m["original_bytes"] for m in self.metas.values())

    @property
    def packed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.parts.values() for t in p.values())

    @property
    def ratio(self) -> float:
        return self.original_bytes / max(self.packed_bytes, 1)

    def summary(self) -> dict[str, Any]:
        by_codec: dict[str, int] = {}
        for m in self.metas.values():
            by_codec[m["codec"]] = by_codec.get(m["codec"], 0) + 1
        return {
            "codec": self.codec,
            "options": self.options,
            "tensors": len(self.metas),
            "tensors_by_codec": by_codec,
            "original_bytes": self.original_bytes,
            "packed_bytes": self.packed_bytes,
            "ratio": round(self.ratio, 3),
            "source": self.source.get("kind"),
        }

    # -- scales (ComPEFT alpha search, BitDelta calibration) -------------------------------------
    def scales(self) -> dict[str, torch.Tensor]:
        """The per-tensor ``scale`` parts of ComPEFT/BitDelta entries (edit in place, or
        rescale)."""
        return {n: self.parts[n]["scale"] for n, m in self.metas.items() if m["codec"] in SCALED}

    def rescaled(self, factor: float) -> "CompressedDelta":
        """A copy whose ComPEFT/BitDelta scales are multiplied by ``factor``."""
        parts = {n: dict(p) for n, p in self.parts.items()}
        for n in self.scales():
            parts[n]["scale"] = parts[n]["scale"] * factor
        return CompressedDelta(self.codec, dict(self.options), self.metas, parts, self.source)

    # -- writing --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the container (and, for an adapter, its ``delta.json``) into directory ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not path.is_dir():
            raise CompressError(f"{path} exists and is not a directory; choose a directory path")
        flat = {
            f"{n}{SEP}{k}": v.detach().cpu().contiguous()
            for n, p in self.parts.items()
            for k, v in p.items()
        }
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **self.summary(),
            "entries": self.metas,
            "source": {k: v for k, v in self.source.items() if k != "adapter_config"},
        }
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(
            path / TENSOR_NAME, lambda tmp: save_file(flat, tmp, metadata={"format": FORMAT})
        )
        write_json(path / JSON_NAME, config)
        if self.source.get("kind") == "adapter":
            adapter = dict(self.source["adapter_config"])
            adapter["compressed"] = {
                "file": TENSOR_NAME,
                "codec": self.codec,
                "ratio": round(self.ratio, 3),
            }
            write_json(path / DELTA_JSON, adapter)
        return path


def compress_tensors(
    tensors: Mapping[str, torch.Tensor],
    codec: str,
    *,
    density: float = 0.1,
    rank: int = 16,
    scale: str = "mean",
    alpha: float = 1.0,
    seed: int = 0,
    values: str = "float32",
    min_numel: int = 1024,
    keep: Sequence[str] = (),
    source: dict[str, Any] | None = None,
) -> CompressedDelta:
    """Encode every eligible tensor of ``tensors`` with ``codec`` (see the module docstring);
    tensors whose names start with one of ``keep`` (e.g. ``"classifier"``, a new head) stay raw."""
    check_options(codec, density, rank, scale, alpha, values)
    if not tensors:
        raise CompressError("nothing to compress: the delta holds no tensors")
    options = {"density": density, "scale": scale, "alpha": alpha} if codec == "compeft" else \
        {"density": density, "seed": seed, "values": values} if codec == "dare" else \
        {"rank": rank} if codec == "lowrank" else {}
    metas: dict[str, dict[str, Any]] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    eligible = 0
    for index, (name, t) in enumerate(tensors.items()):
        if SEP in name:
            raise CompressError(
                f"tensor name {name!r} contains {SEP!r}, which the container reserves"
            )
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CompressError(
                f"tensor {name!r} holds NaN or inf values; fix the delta before compressing it"
            )
        use = t.is_floating_point() and t.dim() >= 2 and t.numel() >= min_numel
        use = use and not any(name == k or name.startswith(k + ".") for k in keep)
        if use and codec == "lowrank" and t.dim() != 2:
            use = False  # conv kernels etc. stay raw; lowrank is for matrices
        chosen = codec if use else "raw"
        eligible += use
        encoder = CODECS[chosen][0]
        p, extra = encoder(
            t,
            density=density,
            rank=rank,
            scale=scale,
            alpha=alpha,
            seed=seed,
            values=values,
            index=index,
        )
        parts[name] = p
        metas[name] = {
            "codec": chosen,
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "original_bytes": t.numel() * (4 if t.is_floating_point() else t.element_size()),
            **extra,
        }
    if not eligible:
        raise CompressError(
            f"no tensor of this delta can take the {codec} codec (it needs floating tensors with "
            f">= 2 dimensions and >= {min_numel} entries); lower --min-numel or keep the delta as "
            "it is"
        )
    return CompressedDelta(codec, options, metas, parts, dict(source or {}))


def compress_adapter(path: str | Path, codec: str, **options: Any) -> CompressedDelta:
    """Compress the tensors of a deltatune adapter directory (any method)."""
    from ..io.files import load_tensors

    path = Path(path)
    config = read_json(path / DELTA_JSON)
    if config.get("compressed"):
        raise CompressError(
            f"{path} is already compressed ({config['compressed'].get('codec')}); compress the "
            "original"
        )
    from ..core.spec import registered_methods

    method = registered_methods().get(str(config.get("method")))
    if codec == "lowrank" and method is not None and method.factored:
        raise CompressError(
            f"{path} holds a {config['method']} delta, already low-rank factors; lowrank "
            "extraction is for full fine-tuning deltas (use compeft, bitdelta, dare, int8 or int4)"
        )
    tensors = load_tensors(path / DELTA_TENSORS)
    return compress_tensors(
        tensors,
        codec,
        source={"kind": "adapter", "method": config.get("method"), "adapter_config": config},
        **options,
    )


def compress_checkpoint(
    finetuned: str | Path, base: str | Path, codec: str, **options: Any
) -> CompressedDelta:
    """Compress the task vector ``finetuned − base`` of two safetensors checkpoints (files or shard
    dirs)."""
    from ..algebra import TaskVector

    tv = TaskVector.from_checkpoints(base, finetuned)
    return compress_task_vector(tv, codec, **options)


def compress_task_vector(tv, codec: str, **options: Any) -> CompressedDelta:
    dense = {n: (v if isinstance(v, torch.Tensor) else v.dense()) for n, v in tv.items()}
    return compress_tensors(dense, codec, source={"kind": "task_vector"}, **options)


def load_compressed(path: str | Path) -> CompressedDelta:
    """Read a container written by :meth:`CompressedDelta.save` (checked; tensors memory-mapped)."""
    from safetensors import safe_open

    path = Path(path)
    if not (path / JSON_NAME).is_file():
        raise CompressError(
            f"{path} holds no {JSON_NAME}; pass a directory written by `deltatune compress`"
        )
    config = read_json(path / JSON_NAME)
    if config.get("format") != FORMAT:
        raise CompressError(
            f"{path / JSON_NAME} is not a compressed delta (format={config.get('format')!r})"
        )
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CompressError(
            f"{path} was written by a newer deltatune (format version {version}); upgrade to read "
            "it"
        )
    metas = config.get("entries")
    if not isinstance(metas, dict) or not metas:
        raise CompressError(f"{path / JSON_NAME} lists no entries; the file is corrupt")
    parts: dict[str, dict[str, torch.Tensor]] = {n: {} for n in metas}
    tensor_file = path / TENSOR_NAME
    try:
        with safe_open(str(tensor_file), framework="pt") as fh:
            for key in fh.keys():
                name, _, part = key.rpartition(SEP)
                if name not in parts:
                    raise CompressError(
                        f"{tensor_file} holds {key!r}, which {JSON_NAME} does not list; the files "
                        "do not belong together"
                    )
                parts[name][part] = fh.get_tensor(key)
    except CompressError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise CompressError(
            f"{tensor_file} is missing, truncated or corrupt ({str(exc).splitlines()[0][:120]}); "
            "compress the delta again"
        ) from None
    for name, meta in metas.items():
        if not parts[name] or not isinstance(meta, dict) or "shape" not in meta:
            raise CompressError(
                f"entry {name!r} has no packed data in {tensor_file}; the file is corrupt"
            )
        if meta.get("codec") not in CODECS:
            raise CompressError(
                f"unknown codec {meta.get('codec')!r} in {path}; it was written by a newer "
                "deltatune"
            )
    source = dict(config.get("source") or {})
    if (path / DELTA_JSON).is_file():
        source["adapter_config"] = read_json(path / DELTA_JSON)
    return CompressedDelta(
        config.get("codec", "?"), config.get("options", {}), metas, parts, source
    )


def read_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The decoded tensors of a compressed adapter directory (``dt.load_adapter`` calls it through
    the reader registered below)."""
    try:
        return load_compressed(path).tensors()
    except CompressError as exc:
        raise DeltaFileError(str(exc)) from None


def describe(path: str | Path) -> dict[str, Any]:
    """What ``deltatune info`` shows for a compressed directory."""
    c = load_compressed(path)
    return {"path": str(path), "format": FORMAT, **c.summary(),
            "file_bytes": (Path(path) / TENSOR_NAME).stat().st_size,
            "method": c.source.get("method") or c.source.get("adapter_config", {}).get("method")}


# io may not import compress: this is how `dt.load_adapter` and `deltatune info` read the container
register_packed_reader(FORMAT, PackedReader(read_adapter_tensors, describe))
