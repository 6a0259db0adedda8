"""`deltatune merge CONFIG --out DIR`: merge checkpoints from a mergekit-style YAML, streamed to
disk."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import typer

from .common import CLIError, write_results

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MiB"``, ``"2e9"`` → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise CLIError(
            f"--shard-size {text!r} is not a size; use e.g. 5GB, 500MB or a number of bytes"
        )
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size < 1:
        raise CLIError(f"--shard-size must be positive, got {text!r}")
    return size


def run_merge(
    config: Path,
    out: Path,
    *,
    overwrite: bool = False,
    shard_size: str = "5GB",
    seed: Optional[int] = None,
    threads: Optional[int] = None,
    console: Any = None,
) -> dict[str, Any]:
    """The merge job as a plain function (the CLI and the tests call it). ``threads`` sets torch's
    intra-op threads for this process (None: leave them)."""
    from ..algebra import load_merge_config, merge_checkpoints
    from ..io.outdir import check_replace
    from .merge_adapters import is_adapter_config, run_adapter_merge

    out = Path(out)
    max_bytes = parse_size(shard_size)
    if threads is not None and threads < 1:
        raise CLIError(f"--threads must be at least 1, got {threads}")
    raw = _read_yaml(config)
    if is_adapter_config(raw):  # `- adapter: DIR` entries: one merged adapter, not checkpoints
        return run_adapter_merge(config, raw, out, overwrite=overwrite, seed=seed)
    cfg = load_merge_config(config)
    check_replace(
        out,
        overwrite,
        [
            config,
            cfg.base,
            *(m.path for m in cfg.models),
            *(m.stats for m in cfg.models if m.stats),
        ],
    )  # an input is never replaced
    if seed is not None:
        cfg.seed = seed

    def finalize(tmp: Path, summary: dict[str, Any]) -> None:
        write_results(tmp, {"job": "merge", "config": str(config), "out": str(out), **summary,
                            "threads": torch.get_num_threads()})

    import torch

    progress = _progress(console)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        summary = merge_checkpoints(
            cfg,
            out,
            overwrite=overwrite,
            max_shard_bytes=max_bytes,
            progress=progress.update if progress else None,
            finalize=finalize,
        )
    finally:
        torch.set_num_threads(previous)
        if progress:
            progress.close()
    return {**summary, "threads": threads or previous}


def _read_yaml(config: Path) -> Any:
    """The config as YAML data, or None where it does not read (load_merge_config then names the
    problem)."""
    try:
        import yaml

        return yaml.safe_load(Path(config).read_text())
    except Exception:  # noqa: BLE001 - reported by load_merge_config with its own message
        return None


class _Bar:
    def __init__(self, console: Any) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(
            TextColumn("merging"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
            transient=True,
        )
        self.task = None

    def update(self, done: int, total: int, name: str) -> None:
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task(name, total=total)
        self.bar.update(self.task, completed=done, description=name)

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()


def _progress(console: Any) -> Optional[_Bar]:
    return None if console is False else _Bar(console)


def register(app: typer.Typer) -> None:
    @app.command(
        "merge",
        help=(
            "Merge model checkpoints (TIES, DARE, task arithmetic, SLERP, ...) one tensor at a "
            "time."
        ),
        epilog=(
            "Examples:\n\n"
            "  deltatune merge ties.yaml --out merged/\n\n"
            "  deltatune merge dare.yaml --out merged/ --overwrite --seed 0 --shard-size 2GB\n\n"
            "  deltatune merge adapters.yaml --out runs/both   # '- adapter: DIR' entries\n\n"
            "The YAML is mergekit's (merge_method, base_model, models with parameters such as "
            "weight and density, parameters, dtype, out_dtype) plus deltatune's methods (fisher, "
            "regmean: add 'stats: FILE' to each model). Entries '- adapter: DIR' (adapters of "
            "one base model; task_arithmetic, ties, dare_*, breadcrumbs*, della*) merge into one "
            "adapter that eval, generate and export take with --adapter."
        ),
    )
    def merge(
        config: Path = typer.Argument(..., help="merge config (mergekit-style YAML)"),
        out: Path = typer.Option(
            ..., "--out", "-o",
            help="output directory: the merged safetensors shards, or the merged adapter",
        ),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="replace an existing output directory"
        ),
        shard_size: str = typer.Option(
            "5GB", "--shard-size", help="maximum bytes per output shard (5GB, 500MB, ...)"
        ),
        seed: Optional[int] = typer.Option(
            None, "--seed", help="seed for the random methods (DARE, DELLA)"
        ),
        threads: int = typer.Option(
            1,
            "--threads",
            help="torch threads; the merge streams memory-bound blocks, "
            "so one thread is usually as fast and far steadier on a shared machine",
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ) -> None:
        from rich.console import Console

        console = Console(stderr=True)
        summary = run_merge(
            config,
            out,
            overwrite=overwrite,
            shard_size=shard_size,
            seed=seed,
            threads=threads,
            console=False if quiet else console,
        )
        if not quiet and summary.get("kind") == "adapters":
            console.print(
                f"[bold]{summary['method']}[/]: {len(summary['adapters'])} adapters of "
                f"{summary['model']} → one adapter in {out} (rank {summary['rank']}, "
                f"{summary['bytes'] / 1e6:.1f} MB) in {summary['seconds']:.1f}s"
            )
        elif not quiet:
            console.print(
                f"[bold]{summary['method']}[/]: {summary['tensors']} tensors → {out} "
                f"({summary['shards']} shard(s), {summary['total_bytes'] / 1e6:.1f} MB) in "
                f"{summary['seconds']:.1f}s, peak memory {summary['peak_rss_mb']:.0f} MiB"
            )
