"""`deltatune adapt`: test-time adaptation on a data stream; its running error (or entropy) beside
the unadapted model's, computed by :func:`deltatune.deploy.evaluate_stream`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from .common import output_job, prepare_out, write_results
from .deploy_inputs import data_batches, default_out, load_entry, pyplot, save_plot


@output_job("adapt")
def run_adapt(
    model: str,
    data: str,
    *,
    out: Path,
    method: str = "safe",
    options: Optional[dict] = None,
    adapter: Optional[Path] = None,
    split: str = "test",
    batch_size: int = 64,
    limit: Optional[int] = None,
    compare: bool = True,
    seed: int = 0,
    overwrite: bool = False,
    console=None,
    encoding: Optional[str] = None,
    verify: bool = True,
) -> dict[str, Any]:
    import torch
    from rich.progress import track

    from .. import deploy as dd

    out = prepare_out(out, overwrite, inputs=[data, model, adapter])
    torch.manual_seed(
        seed
    )  # before the model: a bundled model built from scratch gets a reproducible init
    entry = load_entry(model, adapter, verify)
    loader = data_batches(data, entry, split, batch_size, limit, seed, encoding)
    wrapper = dd.adapt(entry.model, method, **(options or {}))
    t0 = time.time()
    curves = dd.evaluate_stream(
        wrapper,
        loader,
        compare=compare,
        progress=lambda batches, name: track(
            batches, description=name, disable=console is None, console=console
        ),
    )
    has_labels = bool(curves["adapted"])
    results = {
        "job": "adapt",
        "model": model,
        "adapter": str(adapter) if adapter else None,
        "data": data,
        "split": split,
        "method": method,
        "options": {k: v for k, v in (options or {}).items()},
        "batch_size": batch_size,
        "batches": len(curves["adapted_entropy"]),
        "error": curves["adapted"][-1] if has_labels else None,
        "source_error": curves["source"][-1] if has_labels and compare else None,
        "mean_entropy": sum(curves["adapted_entropy"]) / max(len(curves["adapted_entropy"]), 1),
        "curves": curves,
        "seconds": time.time() - t0,
    }
    _plot_adapt(out / "adapt.png", curves, method, has_labels)
    write_results(out, results)
    return results


# -- plots ----------------------------------------------------------------------------------------
def _plot_adapt(path: Path, curves: dict, method: str, has_labels: bool) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    suffix, label = (
        ("", "running error (%)") if has_labels else ("_entropy", "mean prediction entropy")
    )
    for name in ("adapted", "source"):
        if curves.get(name + suffix):
            values = curves[name + suffix]
            ax.plot(
                range(1, len(values) + 1),
                values,
                label=method if name == "adapted" else "unadapted",
            )
    ax.set(xlabel="batch", ylabel=label, title=f"test-time adaptation: {method}")
    ax.legend()
    save_plot(fig, path)


# -- CLI ------------------------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    @app.command(
        "adapt",
        help=(
            "Adapt a model at test time on a data stream; report error (or entropy) over the "
            "stream."
        ),
        epilog=(
            "Examples:\n\n"
            "  deltatune adapt --model minilm --adapter runs/airlines/adapter --data "
            "tweet-sentiment:cars\n\n"
            "  deltatune adapt --model small-cnn --adapter runs/mnist/adapter --data "
            "mnist-c:zoom_blur:3 --method tent\n\n"
            "  deltatune adapt --model minilm --adapter runs/airlines/adapter --data "
            "tweet-sentiment:apple --method lame --opt knn=5"
        ),
    )
    def adapt(
        model: str = typer.Option(..., help="model name (see deltatune.models)"),
        data: str = typer.Option(..., help="the test stream: a dataset name or path"),
        method: str = typer.Option(
            "safe",
            help="safe (default: label-shift correction + guarded entropy steps) | bn | alpha_bn | "
            "tent | eata | sar | deyo | roid | shot | cotta | rmt | rotta | t3a | lame | em",
        ),
        opt: list[str] = typer.Option(
            [], "--opt", help="method option as KEY=VALUE (repeatable), e.g. --opt lr=1e-3"
        ),
        adapter: Optional[Path] = typer.Option(
            None, help="a saved delta to load into --model first"
        ),
        split: str = typer.Option("test", help="dataset split to stream"),
        batch_size: int = typer.Option(64, help="stream batch size"),
        limit: Optional[int] = typer.Option(None, help="at most N samples"),
        compare: bool = typer.Option(True, help="also stream the unadapted model for comparison"),
        seed: int = typer.Option(0, help="random seed"),
        encoding: Optional[str] = typer.Option(
            None,
            help="text encoding of a CSV/JSONL --data file (default utf-8, "
            "read strictly), e.g. latin-1",
        ),
        out: Optional[Path] = typer.Option(
            None, help="output directory (results.json, PNG); default runs/adapt-<time>"
        ),
        overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
        no_verify: bool = typer.Option(
            False, "--no-verify", help="skip the adapter's sha256 check (files edited on purpose)"
        ),
    ) -> None:
        from rich.console import Console

        from .spec_options import parse_options

        options = parse_options(opt)
        console = Console(stderr=True)
        res = run_adapt(
            model,
            data,
            out=out or default_out("adapt"),
            method=method,
            options=options,
            adapter=adapter,
            split=split,
            batch_size=batch_size,
            limit=limit,
            compare=compare,
            seed=seed,
            overwrite=overwrite,
            console=console,
            encoding=encoding,
            verify=not no_verify,
        )
        if res["error"] is not None:
            src = (
                f" (unadapted {res['source_error']:.2f}%)"
                if res["source_error"] is not None
                else ""
            )
            console.print(f"{method}: error {res['error']:.2f}%{src} over {res['batches']} batches")
        else:
            console.print(
                f"{method}: mean entropy {res['mean_entropy']:.3f} over {res['batches']} batches "
                "(no labels)"
            )
