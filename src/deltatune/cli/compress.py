"""`deltatune compress SOURCE --codec C --out DIR`: a smaller delta that loads like the original."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Optional

import typer

from .common import CLIError, write_results
from .train import BASE_FILE, TASK_FILE

CODEC_NAMES = ("compeft", "bitdelta", "dare", "int8", "int4", "lowrank")


def run_compress(
    source: Path,
    codec: str,
    out: Path,
    *,
    base: Optional[Path] = None,
    overwrite: bool = False,
    verify: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """The compress job as a plain function: everything is computed before ``out`` is touched, then
    the result is written into a temporary directory beside it and renamed into place."""
    from ..compress import compress_adapter, compress_checkpoint
    from ..compress.container import DELTA_JSON
    from ..io.outdir import check_replace, publish, staging_dir

    source, out = Path(source), Path(out)
    if codec not in CODEC_NAMES:
        raise CLIError(f"unknown codec {codec!r}; choose one of: {', '.join(CODEC_NAMES)}")
    if not source.exists():
        raise CLIError(
            f"{source} does not exist; pass an adapter directory or a fine-tuned checkpoint"
        )
    check_replace(
        out, overwrite, [source, base]
    )  # the source is never replaced, nor a directory holding it
    if int(options.get("min_numel", 0)) < 0:
        raise CLIError(
            f"--min-numel must be 0 or more (tensors with fewer entries stay uncompressed), got "
            f"{options['min_numel']}"
        )
    t0 = time.perf_counter()
    if (source / DELTA_JSON).is_file():
        if base is not None:
            raise CLIError(
                "--base is for full fine-tuned checkpoints; an adapter directory is a delta already"
            )
        # the sha256 recorded when it was saved (a corrupt copy is not compressed into a new file)
        if verify:
            from ..io.adapter import verify_adapter

            verify_adapter(source)
        compressed = compress_adapter(source, codec, **options)
    else:
        if base is None:
            raise CLIError(
                f"{source} is not an adapter directory; for a full fine-tuned checkpoint pass "
                "--base BASE (the checkpoint it was fine-tuned from)"
            )
        compressed = compress_checkpoint(source, base, codec, **options)
    _check_keep(options.get("keep") or (), compressed.names())
    seconds = time.perf_counter() - t0
    tmp = staging_dir(out)  # beside out; clears what a killed compress left there
    try:
        compressed.save(tmp)
        for name in (
            TASK_FILE,
            BASE_FILE,
        ):  # what eval/export need to rebuild the model it was trained for
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        file_bytes = sum(f.stat().st_size for f in tmp.iterdir())
        results = {
            "job": "compress",
            "source": str(source),
            "base": str(base) if base else None,
            "out": str(out),
            **compressed.summary(),
            "bytes_before": compressed.original_bytes,
            "bytes_after": compressed.packed_bytes,
            "file_bytes": file_bytes,
            "seconds": round(seconds, 3),
        }
        write_results(tmp, results)
        publish(tmp, out, job="compress", overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from ..io.files import ordinary_mode

    ordinary_mode(out)
    return results


def _check_keep(keep, names: list[str]) -> None:
    """Every --keep prefix must name a tensor (or a module holding some) of the delta: a typo would
    silently compress the tensors the user meant to keep."""
    for k in keep:
        if not any(n == k or n.startswith(k + ".") for n in names):
            modules = sorted({n.rsplit(".", 1)[0] for n in names})
            raise CLIError(f"--keep {k!r} matches no tensor of the delta; its modules are "
                           f"{', '.join(modules[:6])}{', ...' if len(modules) > 6 else ''}")


def register(app: typer.Typer) -> None:
    @app.command(
        "compress",
        epilog=(
            "Examples:\n\n"
            "  deltatune compress runs/bbc/adapter --codec compeft --density 0.1 --out "
            "runs/bbc/compeft\n\n"
            "  deltatune compress runs/bbc/adapter --codec bitdelta --out runs/bbc/bitdelta\n\n"
            "  deltatune compress ft/model.safetensors --base base/model.safetensors --codec "
            "lowrank --rank 32 --out tv-r32\n\n"
            "  deltatune info runs/bbc/compeft     # codec and ratio\n\n"
            "A compressed adapter directory attaches like the original (dt.load_adapter, deltatune "
            "eval --adapter). A compressed full fine-tuning delta loads with "
            "deltatune.compress.load_compressed(DIR).to_task_vector()."
        ),
    )
    def compress(
        source: Path = typer.Argument(
            ...,
            help="an adapter directory, or a fine-tuned checkpoint (file or shard dir) with --base",
        ),
        codec: str = typer.Option(..., "--codec", "-c", help=f"one of: {', '.join(CODEC_NAMES)}"),
        out: Path = typer.Option(..., "--out", "-o", help="output directory"),
        base: Optional[Path] = typer.Option(
            None, "--base", help="base checkpoint, for a full fine-tuned SOURCE"
        ),
        density: float = typer.Option(
            0.1, "--density", help="compeft/dare: fraction of entries kept"
        ),
        rank: int = typer.Option(16, "--rank", help="lowrank: rank of each matrix"),
        scale: str = typer.Option(
            "mean", "--scale", help="compeft: 'mean' (|kept| mean) or 'std' (paper's σ)"
        ),
        alpha: float = typer.Option(1.0, "--alpha", help="compeft: multiplier of the scale"),
        seed: int = typer.Option(0, "--seed", help="dare: random seed"),
        values: str = typer.Option(
            "float32", "--values", help="dare: dtype of the kept values (float32, float16)"
        ),
        min_numel: int = typer.Option(
            1024, "--min-numel", help="smaller tensors and vectors stay uncompressed"
        ),
        keep: str = typer.Option(
            "", "--keep", help="comma-separated name prefixes kept uncompressed, e.g. classifier"
        ),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="replace an existing output directory"
        ),
        no_verify: bool = typer.Option(
            False, "--no-verify", help="skip the adapter's sha256 check (files edited on purpose)"
        ),
    ) -> None:
        """Compress a delta: ComPEFT, BitDelta, DARE, int8/int4, or low-rank extraction."""
        r = run_compress(
            source,
            codec,
            out,
            base=base,
            overwrite=overwrite,
            verify=not no_verify,
            density=density,
            rank=rank,
            scale=scale,
            alpha=alpha,
            seed=seed,
            values=values,
            min_numel=min_numel,
            keep=tuple(k.strip() for k in keep.split(",") if k.strip()),
        )
        typer.echo(
            f"{codec}: {r['bytes_before'] / 1024:.1f} KiB -> {r['bytes_after'] / 1024:.1f} KiB "
            f"({r['ratio']:.1f}x), {r['tensors']} tensors -> {out}"
        )
