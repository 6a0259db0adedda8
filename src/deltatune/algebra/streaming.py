"""Merging checkpoints on disk, one tensor at a time, into sharded safetensors — atomically.

Everything that can be checked without reading tensor data (method, inputs, names, shapes, dtypes,
output path) is checked before anything is written. The merge then walks the tensors in order:
each is read in row blocks from the input shards, merged by the registered method, and streamed into
the output shard, so peak memory is a few row blocks, not the model. Output goes to a temporary
directory beside the target, renamed into place only when complete; on any error it is removed.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..io.files import write_json
from .checkpoint import Checkpoint, ShardWriter, dtype_from_name
from .config import MergeConfig, layer_count, layer_position, resolve_all
from .errors import MergeError
from .registry import MergeMethod, get_method
from .tensors import row_ranges

Progress = Callable[[int, int, str], None]
DEFAULT_SHARD_BYTES = 5 * 10**9


def rss_mb() -> float:
    """Peak resident memory of this process so far (MiB).

    Linux's ``VmHWM`` where available: ``ru_maxrss`` also counts the image a parent had when it
    forked this process (before exec), which can exceed anything the process itself used.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Prepared:
    """Opened and cross-checked inputs of a merge (no tensor data read yet)."""

    def __init__(self, config: MergeConfig) -> None:
        self.config = config
        self.method: MergeMethod = get_method(config.method)
        entries = config.non_base() if self.method.needs_base else list(config.models)
        if self.method.needs_base and config.base is None:
            raise MergeError(
                f"merge method {config.method!r} needs base_model (the model the others were "
                "fine-tuned from); add it to the config"
            )
        self.method.check_inputs(len(entries), config.base is not None)
        self.entries = entries
        self.base = (
            Checkpoint(config.base) if config.base is not None and self.method.needs_base else None
        )
        self.models = [Checkpoint(e.path) for e in entries]
        self.reference = self.base or self.models[0]
        self.stats: list[Checkpoint] | None = None
        if self.method.stats:
            missing = [e.label for e in entries if e.stats is None]
            if missing:
                raise MergeError(
                    f"merge method {config.method!r} needs a {self.method.stats} statistics file "
                    f"per model; add 'stats: PATH' to {missing[0]}"
                )
            self.stats = [Checkpoint(e.stats) for e in entries]
        self.dtype = dtype_from_name(config.dtype) if config.dtype else None
        self.out_dtype = dtype_from_name(config.out_dtype) if config.out_dtype else None
        self.names = self.reference.names()
        self._check()
        self.n_layers = layer_count(self.names)
        # every tensor's parameters, resolved and range-checked before anything is written
        self.kwargs = {
            n: self.params_for(n) for n in self.names if self.reference.dtype(n).is_floating_point
        }
        self.side_files = self.reference.side_files()

    def _label(self, ckpt: Checkpoint) -> str:
        return "base_model" if ckpt is self.base else str(ckpt.path)

    def _check(self) -> None:
        ref = self.reference
        wanted = set(self.names)
        for ck in [c for c in [self.base, *self.models] if c is not None and c is not ref]:
            have = set(ck.names())
            if have != wanted:
                missing, extra = sorted(wanted - have), sorted(have - wanted)
                what = (
                    f"lacks tensor {missing[0]!r}" if missing else f"has extra tensor {extra[0]!r}"
                )
                raise MergeError(
                    f"{self._label(ck)} {what} that {self._label(ref)} does not; merge checkpoints "
                    "of one architecture"
                )
            for name in self.names:
                if ck.shape(name) != ref.shape(name):
                    raise MergeError(
                        f"tensor {name} is {ref.shape(name)} in {self._label(ref)} but "
                        f"{ck.shape(name)} in {self._label(ck)}; checkpoints of different "
                        "architectures or sizes cannot be merged"
                    )
                a, b = ref.dtype(name), ck.dtype(name)
                if a != b and (
                    self.dtype is None or not (a.is_floating_point and b.is_floating_point)
                ):
                    raise MergeError(
                        f"mixed dtypes: {name} is {str(a).replace('torch.', '')} in "
                        f"{self._label(ref)} but {str(b).replace('torch.', '')} in "
                        f"{self._label(ck)}; set 'dtype: float32' (or bfloat16) in the config"
                    )
        if self.stats is not None:
            for name in self.names:
                present = [name in s for s in self.stats]
                if any(present) and not all(present):
                    lacking = self.entries[present.index(False)].label
                    raise MergeError(
                        f"statistics for {name} exist for some models but not for {lacking}; "
                        "collect them on every model"
                    )

    def out_dtype_of(self, name: str) -> torch.dtype:
        stored = self.reference.dtype(name)
        if not stored.is_floating_point:
            return stored
        return self.out_dtype or self.dtype or stored

    def params_for(self, name: str) -> dict[str, Any]:
        t = layer_position(name, self.n_layers)
        shared = resolve_all(self.config.parameters, name, t)
        if (
            self.config.seed is not None
            and "seed" in self.method.shared_params
            and "seed" not in shared
        ):
            shared["seed"] = self.config.seed
        per_model = [resolve_all(e.parameters, name, t) for e in self.entries]
        return self.method.resolve(per_model, shared, f"tensor {name}: ")


def plan_merge(config: MergeConfig) -> _Prepared:
    """Open and cross-check a merge's inputs without reading tensor data (raises on bad input)."""
    return _Prepared(config)


def merge_checkpoints(
    config: MergeConfig,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Progress | None = None,
    finalize: Callable[[Path, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Merge the checkpoints of ``config`` into directory ``out`` (safetensors shards + config
    files).

    ``finalize(tmp_dir, summary)`` may add files (e.g. results.json) before the atomic rename.
    Returns a summary: method, inputs, tensors, shards, bytes, seconds and peak memory.
    """
    out = Path(out)
    from ..io.outdir import check_replace, staging_dir

    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MergeError(
            f"output {out} exists; pass overwrite=True (--overwrite) or choose another directory"
        )
    # never an input, the current or home directory, or a directory deltatune did not write
    check_replace(out, overwrite, [config.base, *(m.path for m in config.models)])
    start, rss_before = time.perf_counter(), rss_mb()
    prep = plan_merge(config)
    try:
        tmp = staging_dir(
            out
        )  # beside out ("." or ".." resolved); clears what a killed merge left there
    except OSError as exc:
        raise MergeError(
            f"cannot create the output directory {out} ({exc.strerror or exc}); choose a writable "
            "path"
        ) from None
    plan = [(n, prep.reference.shape(n), prep.out_dtype_of(n)) for n in prep.names]
    writer = ShardWriter(tmp, plan, max_shard_bytes)
    try:
        for i, name in enumerate(prep.names):
            if progress is not None:
                progress(i, len(prep.names), name)
            _merge_one(prep, name, writer.tensor(name))
        shards = writer.finish()
        _copy_metadata(prep.side_files, tmp, prep.out_dtype or prep.dtype)
        summary = {
            **config.describe(),
            "tensors": len(prep.names),
            **shards,
            "seconds": round(time.perf_counter() - start, 3),
            "peak_rss_mb": round(rss_mb(), 1),
            "rss_before_mb": round(rss_before, 1),
        }
        if finalize is not None:
            finalize(tmp, summary)
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress is not None:
        progress(len(prep.names), len(prep.names), "")
    return summary


def _merge_one(prep: _Prepared, name: str, sink: ShardWriter) -> None:
    ref = prep.reference
    if not ref.dtype(name).is_floating_point:
        _copy_exact(prep, name, sink)
        return
    kwargs = dict(prep.kwargs[name])
    if prep.stats is not None:
        kwargs["stats"] = [s.source(name) for s in prep.stats] if name in prep.stats[0] else None
    base = prep.base.source(name, prep.dtype) if prep.base is not None else None
    models = [m.source(name, prep.dtype) for m in prep.models]
    prep.method.fn(base, models, out=sink, **kwargs)


def _copy_exact(prep: _Prepared, name: str, sink: ShardWriter) -> None:
    """Integer tensors (token ids, position ids) are not merged: they must agree, and are copied."""
    ref = prep.reference.source(name)
    others = [
        c.source(name)
        for c in [prep.base, *prep.models]
        if c is not None and c is not prep.reference
    ]
    for a, b in row_ranges(ref.shape):
        rows = ref.rows(a, b)
        for o in others:
            if not torch.equal(rows, o.rows(a, b)):
                raise MergeError(
                    f"integer tensor {name} differs between {prep.reference.path} and "
                    f"{o.ckpt.path}; they are not one architecture"
                )
        sink.write(rows)


def _copy_metadata(side_files: dict[str, Path], tmp: Path, dtype: torch.dtype | None) -> None:
    """Copy the reference's config and tokenizer files (already checked to lie inside its
    directory)."""
    for fname, src in side_files.items():
        shutil.copyfile(src, tmp / fname)
    cfg = tmp / "config.json"
    if dtype is not None and cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return
        if not isinstance(data, dict):
            return
        name = str(dtype).replace("torch.", "")
        for key in ("torch_dtype", "dtype"):
            if key in data:
                data[key] = name
        write_json(cfg, data)


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished directory into place (an earlier deltatune output there is swapped out,
    then deleted; files deltatune did not write in it are kept)."""
    from ..io.outdir import publish

    publish(tmp, out, job="merge", overwrite=overwrite)
