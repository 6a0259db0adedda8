"""`deltatune detect`: has the data drifted from the reference? (two-sample tests, windows)"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from .common import CLIError, output_job, prepare_out, write_results
from .deploy_inputs import (
    MIN_DETECT_SAMPLES,
    both_files,
    check_features,
    data_batches,
    default_out,
    load_entry,
    pyplot,
    read_features,
    save_plot,
    warn_few,
)


@output_job("detect")
def run_detect(
    reference: str,
    target: str,
    *,
    out: Path,
    test: str = "mmd",
    alpha: float = 0.05,
    model: Optional[str] = None,
    adapter: Optional[Path] = None,
    layer: Optional[str] = None,
    window: Optional[int] = None,
    key: Optional[str] = None,
    permutations: int = 500,
    split: str = "test",
    limit: Optional[int] = None,
    batch_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    console=None,
    reference_split: Optional[str] = None,
    encoding: Optional[str] = None,
    verify: bool = True,
) -> dict[str, Any]:
    from .. import deploy as dd

    files = both_files(reference, target, model, "feature")
    if window is not None and window < 1:
        raise CLIError(f"--window must be a positive number of samples, got {window}")
    reference_split = reference_split or split
    if files:  # read and checked before --out is created: a bad file leaves nothing behind
        ref, tgt = read_features(Path(reference), key), read_features(Path(target), key)
        ref, tgt = check_features(ref, tgt, reference, target)
    out = prepare_out(out, overwrite, inputs=[reference, target, model, adapter])
    options: dict[str, Any] = {"n_permutations": permutations} if test == "mmd" else {}
    if not files:
        import torch

        torch.manual_seed(
            seed
        )  # before the model: a bundled model built from scratch gets a reproducible init
        entry = load_entry(model, adapter, verify)
        outputs = test in ("bbsd", "label")
        ref, tgt = (
            dd.embed(
                entry.model,
                data_batches(spec, entry, s, batch_size, limit, seed, encoding),
                outputs=outputs,
                layer=layer,
            )
            for spec, s in ((reference, reference_split), (target, split))
        )
    warn_few(len(ref), len(tgt), MIN_DETECT_SAMPLES, f"the {test} test")
    t0 = time.time()
    if window:
        monitor = dd.DriftMonitor(ref, test, alpha, window=window, seed=seed, **options)
        from rich.progress import track

        steps = range(0, len(tgt), batch_size)
        for i in track(steps, description="windows", disable=console is None, console=console):
            monitor.update(tgt[i : i + batch_size])
        if not monitor.history:
            raise CLIError(
                f"the target has {len(tgt)} samples, fewer than --window {window}; lower --window"
            )
        summary = {
            "windows": len(monitor.history),
            "drift_windows": sum(h["drift"] for h in monitor.history),
            "min_p_value": min(h["p_value"] for h in monitor.history),
            "history": monitor.history,
        }
        _plot_stream(
            out / "p_values.png", monitor.history, alpha, f"{test}: p-value per window of {window}"
        )
    else:
        result = dd.detect(ref, tgt, test, alpha, seed=seed, **options)
        summary = result.to_dict()
        if "adjusted_p_values" in result.details:
            summary["adjusted_p_values"] = result.details["adjusted_p_values"]
        _plot_result(out / "detect.png", result)
    results = {
        "job": "detect",
        "reference": reference,
        "target": target,
        "model": model,
        "adapter": str(adapter) if adapter else None,
        "test": test,
        "alpha": alpha,
        **({} if files else {"reference_split": reference_split, "split": split}),
        "n_reference": len(ref),
        "n_target": len(tgt),
        "features": int(ref.reshape(len(ref), -1).shape[1]),
        **summary,
        "seconds": time.time() - t0,
    }
    write_results(out, results)
    return results


# -- plots ----------------------------------------------------------------------------------------
def _plot_stream(path: Path, history: list[dict], alpha: float, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.semilogy(
        [h["position"] for h in history], [max(h["p_value"], 1e-6) for h in history], "o-", ms=3
    )
    ax.axhline(alpha, color="red", ls="--", label=f"alpha = {alpha}")
    ax.set(xlabel="target samples seen", ylabel="p-value", title=title)
    ax.legend()
    save_plot(fig, path)


def _plot_result(path: Path, result) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    null = result.details.get("null_statistics")
    if null:
        ax.hist(null, bins=40, color="grey", label="permutation null")
        ax.axvline(result.statistic, color="red", label=f"observed (p = {result.p_value:.3g})")
        ax.set(xlabel="MMD²", ylabel="count")
    elif "adjusted_p_values" in result.details:
        p = result.details["adjusted_p_values"]
        ax.semilogy(
            range(len(p)),
            [max(v, 1e-12) for v in p],
            "o",
            ms=3,
            label="adjusted p-value per feature",
        )
        ax.axhline(result.alpha, color="red", ls="--", label=f"alpha = {result.alpha}")
        ax.set(xlabel="feature", ylabel="p-value")
    else:
        ax.bar(["p-value", "alpha"], [result.p_value, result.alpha], color=["tab:blue", "tab:red"])
    ax.set_title(f"{result.test}: drift = {result.drift}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    save_plot(fig, path)


# -- CLI ------------------------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    @app.command(
        "detect",
        help=(
            "Test whether target data drifted from reference data (p-value, decision, PNG, "
            "results.json)."
        ),
        epilog=(
            "Examples:\n\n"
            "  deltatune detect --reference clean.npy --target new.npy --test mmd --out "
            "runs/drift\n\n"
            "  deltatune detect --reference clean.npy --target stream.npy --window 200 --out "
            "runs/stream\n\n"
            "  deltatune detect --model small-cnn --adapter runs/mnist/adapter --reference mnist "
            "--target mnist-c:brightness:3 --test bbsd"
        ),
    )
    def detect(
        reference: str = typer.Option(
            ..., help="reference features (.npy/.safetensors) or a dataset name with --model"
        ),
        target: str = typer.Option(
            ..., help="target features or dataset, same kind as --reference"
        ),
        test: str = typer.Option("mmd", help="mmd | ks | classifier | bbsd | label"),
        alpha: float = typer.Option(0.05, help="significance level"),
        model: Optional[str] = typer.Option(
            None, help="model name, to compute features/outputs of datasets"
        ),
        adapter: Optional[Path] = typer.Option(
            None, help="a saved delta to load into --model first"
        ),
        layer: Optional[str] = typer.Option(
            None, help="features = input of this module (default: the last Linear)"
        ),
        window: Optional[int] = typer.Option(
            None, help="stream the target in sliding windows of N samples"
        ),
        key: Optional[str] = typer.Option(
            None, help="tensor name inside .safetensors feature files"
        ),
        permutations: int = typer.Option(500, help="MMD permutations"),
        split: str = typer.Option("test", help="dataset split"),
        limit: Optional[int] = typer.Option(None, help="at most N samples per dataset"),
        batch_size: int = typer.Option(64, help="batch size (model forward, stream step)"),
        seed: int = typer.Option(0, help="random seed (permutations, subsampling)"),
        encoding: Optional[str] = typer.Option(
            None,
            help="text encoding of CSV/JSONL data files (default utf-8, "
            "read strictly), e.g. latin-1",
        ),
        out: Optional[Path] = typer.Option(
            None, help="output directory (results.json, PNG); default runs/detect-<time>"
        ),
        overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
        no_verify: bool = typer.Option(
            False, "--no-verify", help="skip the adapter's sha256 check (files edited on purpose)"
        ),
    ) -> None:
        from rich.console import Console

        console = Console(stderr=True)
        res = run_detect(
            reference,
            target,
            out=out or default_out("detect"),
            test=test,
            alpha=alpha,
            model=model,
            adapter=adapter,
            layer=layer,
            window=window,
            key=key,
            permutations=permutations,
            split=split,
            limit=limit,
            batch_size=batch_size,
            seed=seed,
            overwrite=overwrite,
            console=console,
            encoding=encoding,
            verify=not no_verify,
        )
        if window:
            console.print(
                f"{res['drift_windows']} of {res['windows']} windows drifted (alpha {alpha}); "
                f"min p = {res['min_p_value']:.3g}"
            )
        else:
            console.print(
                f"{test}: p = {res['p_value']:.4g} -> {'DRIFT' if res['drift'] else 'no drift'} "
                f"(alpha {alpha})"
            )
