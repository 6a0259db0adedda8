"""`deltatune detect` and `deltatune adapt`: shift detection and test-time adaptation after deployment."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from .common import CLIError, prepare_out, write_results

FEATURE_SUFFIXES = (".npy", ".safetensors")


# -- inputs ------------------------------------------------------------------------------------------
def read_features(path: Path, key: Optional[str] = None):
    """A (samples, features) tensor from a .npy file (no pickles) or a safetensors file (``key``, or
    its only tensor)."""
    import numpy as np
    import torch

    if not path.is_file():
        raise CLIError(
            f"{path} does not exist; give a .npy or .safetensors feature file, or a dataset name with --model"
        )
    if path.suffix == ".npy":
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as exc:
            reason = str(exc).splitlines()[0]
            raise CLIError(f"{path} is not a plain numeric .npy array ({reason}); save it with np.save") from None
    from ..io.files import load_tensors

    tensors = load_tensors(path)
    if key is None:
        if len(tensors) != 1:
            names = ", ".join(list(tensors)[:5])
            raise CLIError(f"{path} holds {len(tensors)} tensors ({names}); pick one with --key")
        return next(iter(tensors.values()))
    if key not in tensors:
        raise CLIError(f"{path} has no tensor {key!r}; it holds {', '.join(list(tensors)[:8])}")
    return tensors[key]


def _is_feature_file(value: str) -> bool:
    return Path(value).suffix in FEATURE_SUFFIXES


def load_entry(model: str, adapter: Optional[Path]):
    """The model entry from ``deltatune.models`` (with ``adapter`` loaded when given)."""
    try:
        from ..models import load_model  # noqa: F401
    except ImportError:
        raise CLIError("deltatune.models is not available in this installation; pass feature files instead") from None
    if adapter is not None:
        from .train import load_trained

        entry, _ = load_trained(model, adapter)
        return entry
    from ..models import load_model

    entry = load_model(model)
    entry.model.eval()
    return entry


def data_batches(spec: str, entry, split: str, batch_size: int, limit: Optional[int], seed: int = 0):
    """Batches of dataset ``spec`` (``deltatune.data.load_data``) collated for the model, in order."""
    try:
        from ..data import load_data
    except ImportError:
        raise CLIError("deltatune.data is not available in this installation; pass feature files instead") from None
    from torch.utils.data import DataLoader

    dataset = load_data(spec, split, seed=seed, limit=limit)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=entry.collate)


def batch_labels(batch: Any):
    if isinstance(batch, dict):
        return batch.get("labels", batch.get("label"))
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    return None


# -- the jobs as plain functions ---------------------------------------------------------------------
def run_detect(reference: str, target: str, *, out: Path, test: str = "mmd", alpha: float = 0.05,
               model: Optional[str] = None, adapter: Optional[Path] = None, layer: Optional[str] = None,
               window: Optional[int] = None, key: Optional[str] = None, permutations: int = 500,
               split: str = "test", limit: Optional[int] = None, batch_size: int = 64, seed: int = 0,
               overwrite: bool = False, console=None) -> dict[str, Any]:
    from .. import deploy as dd

    files = [_is_feature_file(v) for v in (reference, target)]
    if any(files) and not all(files):
        raise CLIError("--reference and --target must both be feature files (.npy/.safetensors) or both datasets")
    if not all(files) and model is None:
        raise CLIError("datasets need --model to compute features; or pass .npy/.safetensors feature files")
    out = prepare_out(out, overwrite)
    options: dict[str, Any] = {"n_permutations": permutations} if test == "mmd" else {}
    if all(files):
        ref, tgt = read_features(Path(reference), key), read_features(Path(target), key)
    else:
        import torch

        torch.manual_seed(seed)  # before the model: a bundled model built from scratch gets a reproducible init
        entry = load_entry(model, adapter)
        outputs = test in ("bbsd", "label")
        ref, tgt = (dd.embed(entry.model, data_batches(spec, entry, split, batch_size, limit, seed), outputs=outputs,
                             layer=layer) for spec in (reference, target))
    t0 = time.time()
    if window:
        monitor = dd.DriftMonitor(ref, test, alpha, window=window, seed=seed, **options)
        from rich.progress import track

        steps = range(0, len(tgt), batch_size)
        for i in track(steps, description="windows", disable=console is None, console=console):
            monitor.update(tgt[i : i + batch_size])
        if not monitor.history:
            raise CLIError(f"the target has {len(tgt)} samples, fewer than --window {window}; lower --window")
        summary = {"windows": len(monitor.history), "drift_windows": sum(h["drift"] for h in monitor.history),
                   "min_p_value": min(h["p_value"] for h in monitor.history), "history": monitor.history}
        _plot_stream(out / "p_values.png", monitor.history, alpha, f"{test}: p-value per window of {window}")
    else:
        result = dd.detect(ref, tgt, test, alpha, seed=seed, **options)
        summary = result.to_dict()
        if "adjusted_p_values" in result.details:
            summary["adjusted_p_values"] = result.details["adjusted_p_values"]
        _plot_result(out / "detect.png", result)
    results = {"job": "detect", "reference": reference, "target": target, "model": model,
               "adapter": str(adapter) if adapter else None, "test": test, "alpha": alpha,
               "n_reference": len(ref), "n_target": len(tgt), "features": int(ref.reshape(len(ref), -1).shape[1]),
               **summary, "seconds": time.time() - t0}
    write_results(out, results)
    return results


def run_adapt(model: str, data: str, *, out: Path, method: str = "tent", options: Optional[dict] = None,
              adapter: Optional[Path] = None, split: str = "test", batch_size: int = 64, limit: Optional[int] = None,
              compare: bool = True, seed: int = 0, overwrite: bool = False, console=None) -> dict[str, Any]:
    import torch

    from .. import deploy as dd
    from ..deploy.batch import call_model, get_logits

    out = prepare_out(out, overwrite)
    torch.manual_seed(seed)  # before the model: a bundled model built from scratch gets a reproducible init
    entry = load_entry(model, adapter)
    loader = data_batches(data, entry, split, batch_size, limit, seed)
    wrapper = dd.adapt(entry.model, method, **(options or {}))
    curves: dict[str, list[float]] = {}
    t0 = time.time()
    from rich.progress import track

    runs = [("adapted", wrapper)] + ([("source", None)] if compare else [])
    for name, fn in runs:
        wrong, seen, curve, entropy = 0, 0, [], []
        for batch in track(loader, description=name, disable=console is None, console=console):
            if fn is None:
                with torch.no_grad():
                    output = call_model(entry.model, batch)
            else:
                output = call_model(fn, batch)
            logits = get_logits(output).detach()
            entropy.append(float(dd.softmax_entropy(logits.float()).mean()))
            labels = batch_labels(batch)
            if labels is not None:
                wrong += int((logits.argmax(-1) != labels.to(logits.device)).sum())
                seen += len(labels)
                curve.append(100.0 * wrong / seen)
        curves[name] = curve
        curves[f"{name}_entropy"] = entropy
        if name == "adapted":
            wrapper.remove(reset=True)  # the source pass must see the untouched model
    has_labels = bool(curves["adapted"])
    results = {"job": "adapt", "model": model, "adapter": str(adapter) if adapter else None, "data": data,
               "split": split, "method": method, "options": {k: v for k, v in (options or {}).items()},
               "batch_size": batch_size, "batches": len(curves["adapted_entropy"]),
               "error": curves["adapted"][-1] if has_labels else None,
               "source_error": curves["source"][-1] if has_labels and compare else None,
               "mean_entropy": sum(curves["adapted_entropy"]) / max(len(curves["adapted_entropy"]), 1),
               "curves": curves, "seconds": time.time() - t0}
    _plot_adapt(out / "adapt.png", curves, method, has_labels)
    write_results(out, results)
    return results


# -- plots -------------------------------------------------------------------------------------------
def _save(fig, path: Path) -> None:
    from ..io.files import save_figure

    save_figure(fig, path, dpi=110, bbox_inches="tight")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_stream(path: Path, history: list[dict], alpha: float, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.semilogy([h["position"] for h in history], [max(h["p_value"], 1e-6) for h in history], "o-", ms=3)
    ax.axhline(alpha, color="red", ls="--", label=f"alpha = {alpha}")
    ax.set(xlabel="target samples seen", ylabel="p-value", title=title)
    ax.legend()
    _save(fig, path)


def _plot_result(path: Path, result) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    null = result.details.get("null_statistics")
    if null:
        ax.hist(null, bins=40, color="grey", label="permutation null")
        ax.axvline(result.statistic, color="red", label=f"observed (p = {result.p_value:.3g})")
        ax.set(xlabel="MMD²", ylabel="count")
    elif "adjusted_p_values" in result.details:
        p = result.details["adjusted_p_values"]
        ax.semilogy(range(len(p)), [max(v, 1e-12) for v in p], "o", ms=3, label="adjusted p-value per feature")
        ax.axhline(result.alpha, color="red", ls="--", label=f"alpha = {result.alpha}")
        ax.set(xlabel="feature", ylabel="p-value")
    else:
        ax.bar(["p-value", "alpha"], [result.p_value, result.alpha], color=["tab:blue", "tab:red"])
    ax.set_title(f"{result.test}: drift = {result.drift}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    _save(fig, path)


def _plot_adapt(path: Path, curves: dict, method: str, has_labels: bool) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    suffix, label = ("", "running error (%)") if has_labels else ("_entropy", "mean prediction entropy")
    for name in ("adapted", "source"):
        if curves.get(name + suffix):
            values = curves[name + suffix]
            ax.plot(range(1, len(values) + 1), values, label=method if name == "adapted" else "unadapted")
    ax.set(xlabel="batch", ylabel=label, title=f"test-time adaptation: {method}")
    ax.legend()
    _save(fig, path)


# -- CLI ---------------------------------------------------------------------------------------------
def _default_out(job: str) -> Path:
    return Path("runs") / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"


def register(app: typer.Typer) -> None:
    @app.command(
        "detect",
        epilog=("Examples:\n\n"
                "  deltatune detect --reference clean.npy --target new.npy --test mmd --out runs/drift\n\n"
                "  deltatune detect --reference clean.npy --target stream.npy --window 200 --out runs/stream\n\n"
                "  deltatune detect --model small-cnn --adapter runs/mnist/adapter --reference mnist "
                "--target mnist-c:fog:3 --test bbsd"),
    )
    def detect(
        reference: str = typer.Option(..., help="reference features (.npy/.safetensors) or a dataset name with --model"),
        target: str = typer.Option(..., help="target features or dataset, same kind as --reference"),
        test: str = typer.Option("mmd", help="mmd | ks | classifier | bbsd | label"),
        alpha: float = typer.Option(0.05, help="significance level"),
        model: Optional[str] = typer.Option(None, help="model name, to compute features/outputs of datasets"),
        adapter: Optional[Path] = typer.Option(None, help="a saved delta to load into --model first"),
        layer: Optional[str] = typer.Option(None, help="features = input of this module (default: the last Linear)"),
        window: Optional[int] = typer.Option(None, help="stream the target in sliding windows of N samples"),
        key: Optional[str] = typer.Option(None, help="tensor name inside .safetensors feature files"),
        permutations: int = typer.Option(500, help="MMD permutations"),
        split: str = typer.Option("test", help="dataset split"),
        limit: Optional[int] = typer.Option(None, help="at most N samples per dataset"),
        batch_size: int = typer.Option(64, help="batch size (model forward, stream step)"),
        seed: int = typer.Option(0, help="random seed (permutations, subsampling)"),
        out: Optional[Path] = typer.Option(None, help="output directory (results.json, PNG); default runs/detect-<time>"),
        overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
    ) -> None:
        """Test whether target data drifted from reference data (p-value, decision, PNG, results.json)."""
        from rich.console import Console

        console = Console(stderr=True)
        res = run_detect(reference, target, out=out or _default_out("detect"), test=test, alpha=alpha, model=model,
                         adapter=adapter, layer=layer, window=window, key=key, permutations=permutations, split=split,
                         limit=limit, batch_size=batch_size, seed=seed, overwrite=overwrite, console=console)
        if window:
            console.print(f"{res['drift_windows']} of {res['windows']} windows drifted (alpha {alpha}); "
                          f"min p = {res['min_p_value']:.3g}")
        else:
            console.print(f"{test}: p = {res['p_value']:.4g} -> {'DRIFT' if res['drift'] else 'no drift'} (alpha {alpha})")

    @app.command(
        "adapt",
        epilog=("Examples:\n\n"
                "  deltatune adapt --model small-cnn --adapter runs/mnist/adapter --data mnist-c:fog:3 --method tent\n\n"
                "  deltatune adapt --model minilm --adapter runs/airlines/adapter --data tweet-sentiment:apple "
                "--method lame --opt knn=5"),
    )
    def adapt(
        model: str = typer.Option(..., help="model name (see deltatune.models)"),
        data: str = typer.Option(..., help="the test stream: a dataset name or path"),
        method: str = typer.Option("tent", help="bn | alpha_bn | tent | eata | sar | cotta | lame | em"),
        opt: list[str] = typer.Option([], "--opt", help="method option as KEY=VALUE (repeatable), e.g. --opt lr=1e-3"),
        adapter: Optional[Path] = typer.Option(None, help="a saved delta to load into --model first"),
        split: str = typer.Option("test", help="dataset split to stream"),
        batch_size: int = typer.Option(64, help="stream batch size"),
        limit: Optional[int] = typer.Option(None, help="at most N samples"),
        compare: bool = typer.Option(True, help="also stream the unadapted model for comparison"),
        seed: int = typer.Option(0, help="random seed"),
        out: Optional[Path] = typer.Option(None, help="output directory (results.json, PNG); default runs/adapt-<time>"),
        overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
    ) -> None:
        """Adapt a model at test time on a data stream; report error (or entropy) over the stream."""
        from rich.console import Console

        from .spec_options import parse_options

        options = parse_options(opt)
        console = Console(stderr=True)
        res = run_adapt(model, data, out=out or _default_out("adapt"), method=method, options=options, adapter=adapter,
                        split=split, batch_size=batch_size, limit=limit, compare=compare, seed=seed,
                        overwrite=overwrite, console=console)
        if res["error"] is not None:
            src = f" (unadapted {res['source_error']:.2f}%)" if res["source_error"] is not None else ""
            console.print(f"{method}: error {res['error']:.2f}%{src} over {res['batches']} batches")
        else:
            console.print(f"{method}: mean entropy {res['mean_entropy']:.3f} over {res['batches']} batches (no labels)")
