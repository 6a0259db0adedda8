"""`deltatune detect`, `deltatune estimate` and `deltatune adapt`: shift detection, label-free accuracy
estimation and test-time adaptation after deployment."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from .common import CLIError, output_job, prepare_out, write_results

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
            array = np.load(path, allow_pickle=False)  # never unpickle: an object array is refused here
        except (ValueError, OSError, EOFError) as exc:
            reason = str(exc).splitlines()[0]
            raise CLIError(f"{path} is not a plain numeric .npy array ({reason}); save it with np.save") from None
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
            kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
            raise CLIError(f"{path} holds {kind} values, not numbers; save a numeric array with np.save")
        return torch.from_numpy(np.asarray(array, dtype=array.dtype.newbyteorder("=")))  # torch: native order only
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


#: below these sample counts a test or estimate is unreliable: a one-line warning on stderr
MIN_DETECT_SAMPLES = 30  # per side; the two-sample tests have little power below it
MIN_ESTIMATE_REFERENCE, MIN_ESTIMATE_TARGET = 100, 30  # calibration and thresholds need the reference


def _warn_few(n_reference: int, n_target: int, minimum: int | tuple[int, int], what: str) -> None:
    low_ref, low_tgt = minimum if isinstance(minimum, tuple) else (minimum, minimum)
    few = [f"{name} has {n} samples (fewer than {low})" for name, n, low in
           (("the reference", n_reference, low_ref), ("the target", n_target, low_tgt)) if n < low]
    if few:
        print(f"warning: {' and '.join(few)}; {what} is unreliable on so few; use more data (--limit, or "
              "another --split / --reference-split)", file=sys.stderr)


def _check_features(ref, tgt, reference: str, target: str):
    """Feature files as (samples, features...) with the same features on both sides; a 1-D array is one
    feature per sample."""
    for t, name in ((ref, reference), (tgt, target)):
        if t.dim() == 0 or len(t) == 0:
            raise CLIError(f"{name} holds an array of shape {tuple(t.shape)}; features must be (samples, features)")
    ref, tgt = (t.reshape(-1, 1) if t.dim() == 1 else t for t in (ref, tgt))
    if ref.shape[1:] != tgt.shape[1:]:
        raise CLIError(f"reference and target features differ in shape: {tuple(ref.shape)} vs {tuple(tgt.shape)}; "
                       "compute both with the same model and layer")
    return ref, tgt


def _is_feature_file(value: str) -> bool:
    return Path(value).suffix in FEATURE_SUFFIXES


def _both_files(reference: str, target: str, model: Optional[str], what: str) -> bool:
    """True when --reference and --target are both ``what`` files (.npy/.safetensors), False when both are
    datasets (which need --model); a one-line error for a mix, or datasets without a model."""
    files = [_is_feature_file(v) for v in (reference, target)]
    if any(files) and not all(files):
        raise CLIError(f"--reference and --target must both be {what} files (.npy/.safetensors) or both datasets")
    if not all(files) and model is None:
        raise CLIError(f"datasets need --model to compute {what}s; or pass .npy/.safetensors {what} files")
    return all(files)


def load_entry(model: str, adapter: Optional[Path], verify: bool = True):
    """The model entry from ``deltatune.models`` (with ``adapter`` loaded when given; ``verify=False``
    skips its sha256 check)."""
    try:
        from ..models import load_model  # noqa: F401
    except ImportError:
        raise CLIError("deltatune.models is not available in this installation; pass feature files instead") from None
    if adapter is not None:
        from .train import load_trained

        entry, _ = load_trained(model, adapter, verify=verify)
        return entry
    from ..models import load_model

    entry = load_model(model)
    entry.model.eval()
    return entry


def data_batches(spec: str, entry, split: str, batch_size: int, limit: Optional[int], seed: int = 0,
                 encoding: Optional[str] = None):
    """Batches of dataset ``spec`` (``deltatune.data.load_data``) collated for the model, in order."""
    try:
        from ..data import load_data
    except ImportError:
        raise CLIError("deltatune.data is not available in this installation; pass feature files instead") from None
    from torch.utils.data import DataLoader

    dataset = load_data(spec, split, seed=seed, limit=limit, encoding=encoding)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=entry.collate)


def batch_labels(batch: Any):
    if isinstance(batch, dict):
        return batch.get("labels", batch.get("label"))
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    return None


# -- the jobs as plain functions ---------------------------------------------------------------------
@output_job("detect")
def run_detect(reference: str, target: str, *, out: Path, test: str = "mmd", alpha: float = 0.05,
               model: Optional[str] = None, adapter: Optional[Path] = None, layer: Optional[str] = None,
               window: Optional[int] = None, key: Optional[str] = None, permutations: int = 500,
               split: str = "test", limit: Optional[int] = None, batch_size: int = 64, seed: int = 0,
               overwrite: bool = False, console=None, reference_split: Optional[str] = None,
               encoding: Optional[str] = None, verify: bool = True) -> dict[str, Any]:
    from .. import deploy as dd

    files = _both_files(reference, target, model, "feature")
    if window is not None and window < 1:
        raise CLIError(f"--window must be a positive number of samples, got {window}")
    reference_split = reference_split or split
    if files:  # read and checked before --out is created: a bad file leaves nothing behind
        ref, tgt = read_features(Path(reference), key), read_features(Path(target), key)
        ref, tgt = _check_features(ref, tgt, reference, target)
    out = prepare_out(out, overwrite, inputs=[reference, target, model, adapter])
    options: dict[str, Any] = {"n_permutations": permutations} if test == "mmd" else {}
    if not files:
        import torch

        torch.manual_seed(seed)  # before the model: a bundled model built from scratch gets a reproducible init
        entry = load_entry(model, adapter, verify)
        outputs = test in ("bbsd", "label")
        ref, tgt = (dd.embed(entry.model, data_batches(spec, entry, s, batch_size, limit, seed, encoding), outputs=outputs,
                             layer=layer) for spec, s in ((reference, reference_split), (target, split)))
    _warn_few(len(ref), len(tgt), MIN_DETECT_SAMPLES, f"the {test} test")
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
               **({} if files else {"reference_split": reference_split, "split": split}),
               "n_reference": len(ref), "n_target": len(tgt), "features": int(ref.reshape(len(ref), -1).shape[1]),
               **summary, "seconds": time.time() - t0}
    write_results(out, results)
    return results


def model_logits(entry, loader) -> tuple[Any, Any]:
    """Logits of ``entry.model`` over ``loader`` and the batches' labels (None when the data has none),
    in one pass over the data."""
    import torch

    from .. import deploy as dd

    labels: list = []

    def batches():
        for batch in loader:
            y = batch_labels(batch)
            labels.append(None if y is None else torch.as_tensor(y).long().cpu().flatten())
            yield batch

    try:
        logits = dd.embed(entry.model, batches(), outputs=True, softmax=False)
    except dd.DeployError:
        if not labels:
            raise CLIError("the data yielded no samples; check the dataset name, --split and --limit") from None
        raise
    return logits, (torch.cat(labels) if all(y is not None for y in labels) else None)


def _read_labels(path: Optional[Path], n: int, what: str):
    if path is None:
        return None
    y = read_features(path).flatten()
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise CLIError(f"{path} holds non-integer values; {what} labels must be class indices")
    if y.numel() != n:
        raise CLIError(f"{path} holds {y.numel()} labels for {n} {what} samples; give one label per row")
    return y.long()


@output_job("estimate")
def run_estimate(reference: str, target: str, *, out: Path, model: Optional[str] = None,
                 adapter: Optional[Path] = None, reference_labels: Optional[Path] = None,
                 target_labels: Optional[Path] = None, reference_split: str = "val", split: str = "test",
                 methods: Optional[list[str]] = None, score: str = "entropy", calibrate: bool = True,
                 key: Optional[str] = None, limit: Optional[int] = None, batch_size: int = 64, seed: int = 0,
                 overwrite: bool = False, encoding: Optional[str] = None, verify: bool = True) -> dict[str, Any]:
    """Fit the estimators on labelled reference outputs; estimate the target's accuracy without its labels."""
    from .. import deploy as dd
    from ..deploy.accuracy import ESTIMATES

    methods = list(methods or ESTIMATES)
    unknown = [m for m in methods if m not in ESTIMATES]
    if unknown:
        raise CLIError(f"unknown estimate {unknown[0]!r} in --methods; choose from {', '.join(ESTIMATES)}")
    if score not in ("entropy", "confidence"):
        raise CLIError(f"--score must be entropy or confidence, not {score!r}")
    if _both_files(reference, target, model, "logit"):
        if reference_labels is None:
            raise CLIError("logit files need --reference-labels (the reference's class indices, .npy/.safetensors)")
        ref_z, tgt_z = read_features(Path(reference), key), read_features(Path(target), key)
        ref_y = _read_labels(reference_labels, len(ref_z), "reference")
        tgt_y = _read_labels(target_labels, len(tgt_z), "target")
    else:
        import torch

        if reference_labels is not None or target_labels is not None:
            raise CLIError("--reference-labels/--target-labels go with logit files; datasets bring their own labels")
        torch.manual_seed(seed)  # before the model: a bundled model built from scratch gets a reproducible init
        entry = load_entry(model, adapter, verify)
        ref_z, ref_y = model_logits(entry, data_batches(reference, entry, reference_split, batch_size, limit, seed,
                                                        encoding))
        tgt_z, tgt_y = model_logits(entry, data_batches(target, entry, split, batch_size, limit, seed, encoding))
        if ref_y is None:
            raise CLIError(f"the reference {reference!r} ({reference_split} split) has no labels; the estimators are "
                           "fitted on labelled reference data")
    if ref_z.dim() != 2 or tgt_z.dim() != 2 or ref_z.shape[1] != tgt_z.shape[1]:
        raise CLIError(f"reference and target logits must be (samples, classes) with the same classes, got "
                       f"{tuple(ref_z.shape)} and {tuple(tgt_z.shape)}")
    classes = int(ref_z.shape[1])
    # the fit checks the reference labels; the target's are only compared with, so they are checked here
    if tgt_y is not None and len(tgt_y) and (int(tgt_y.min()) < 0 or int(tgt_y.max()) >= classes):
        bad = int(tgt_y.min()) if int(tgt_y.min()) < 0 else int(tgt_y.max())
        raise CLIError(f"--target-labels must be class indices in [0, {classes - 1}] (the logits have {classes} "
                       f"classes); it holds {bad}")
    _warn_few(len(ref_z), len(tgt_z), (MIN_ESTIMATE_REFERENCE, MIN_ESTIMATE_TARGET), "accuracy estimation")
    t0 = time.time()
    est = dd.fit_accuracy_estimator(ref_z, ref_y, calibrate=calibrate, score=score)
    estimates = est.estimate(tgt_z, methods=methods)
    out = prepare_out(out, overwrite, inputs=[reference, target, model, adapter, reference_labels, target_labels])  # after the fit: bad labels or logits leave no directory behind
    true = float((tgt_z.argmax(-1) == tgt_y).double().mean()) if tgt_y is not None else None
    results = {"job": "estimate", "reference": reference, "target": target, "model": model,
               "adapter": str(adapter) if adapter else None, "reference_split": reference_split, "split": split,
               "n_reference": len(ref_z), "n_target": len(tgt_z), "classes": int(ref_z.shape[1]),
               "estimator": est.to_dict(), "estimated_accuracy": {m: 100.0 * v for m, v in estimates.items()},
               "true_accuracy": None if true is None else 100.0 * true, "seconds": time.time() - t0}
    _plot_estimate(out / "estimate.png", results)
    write_results(out, results)
    return results


@output_job("adapt")
def run_adapt(model: str, data: str, *, out: Path, method: str = "tent", options: Optional[dict] = None,
              adapter: Optional[Path] = None, split: str = "test", batch_size: int = 64, limit: Optional[int] = None,
              compare: bool = True, seed: int = 0, overwrite: bool = False, console=None,
              encoding: Optional[str] = None, verify: bool = True) -> dict[str, Any]:
    import torch

    from .. import deploy as dd
    from ..deploy.batch import call_model, get_logits

    out = prepare_out(out, overwrite, inputs=[data, model, adapter])
    torch.manual_seed(seed)  # before the model: a bundled model built from scratch gets a reproducible init
    entry = load_entry(model, adapter, verify)
    loader = data_batches(data, entry, split, batch_size, limit, seed, encoding)
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


def _plot_estimate(path: Path, results: dict) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    est = results["estimated_accuracy"]
    bars = ax.bar(list(est), list(est.values()), color="tab:blue", label="estimated (no target labels)")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.axhline(100 * results["estimator"]["source_accuracy"], color="grey", ls=":", label="reference accuracy")
    if results["true_accuracy"] is not None:
        ax.axhline(results["true_accuracy"], color="red", ls="--", label="true target accuracy")
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title=f"accuracy of {results['target']}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
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
                "--target mnist-c:brightness:3 --test bbsd"),
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
        encoding: Optional[str] = typer.Option(None, help="text encoding of CSV/JSONL data files (default utf-8, "
                                               "read strictly), e.g. latin-1"),
        out: Optional[Path] = typer.Option(None, help="output directory (results.json, PNG); default runs/detect-<time>"),
        overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
        no_verify: bool = typer.Option(False, "--no-verify", help="skip the adapter's sha256 check (files edited on purpose)"),
    ) -> None:
        """Test whether target data drifted from reference data (p-value, decision, PNG, results.json)."""
        from rich.console import Console

        console = Console(stderr=True)
        res = run_detect(reference, target, out=out or _default_out("detect"), test=test, alpha=alpha, model=model,
                         adapter=adapter, layer=layer, window=window, key=key, permutations=permutations, split=split,
                         limit=limit, batch_size=batch_size, seed=seed, overwrite=overwrite, console=console,
                         encoding=encoding, verify=not no_verify)
        if window:
            console.print(f"{res['drift_windows']} of {res['windows']} windows drifted (alpha {alpha}); "
                          f"min p = {res['min_p_value']:.3g}")
        else:
            console.print(f"{test}: p = {res['p_value']:.4g} -> {'DRIFT' if res['drift'] else 'no drift'} (alpha {alpha})")

    @app.command(
        "estimate",
        epilog=("Examples:\n\n"
                "  deltatune estimate --model small-cnn --adapter runs/mnist/adapter --reference mnist "
                "--target mnist-c:contrast:3\n\n"
                "  deltatune estimate --model minilm --adapter runs/airlines/adapter --reference tweet-sentiment:airlines "
                "--target tweet-sentiment:apple --methods atc,cot\n\n"
                "  deltatune estimate --reference val_logits.npy --reference-labels val_labels.npy --target new_logits.npy"),
    )
    def estimate(
        reference: str = typer.Option(..., help="labelled reference: a dataset name with --model, or a logit file"),
        target: str = typer.Option(..., help="the data whose accuracy to estimate (its labels are not used)"),
        model: Optional[str] = typer.Option(None, help="model name, to compute logits of datasets"),
        adapter: Optional[Path] = typer.Option(None, help="a saved delta to load into --model first"),
        reference_labels: Optional[Path] = typer.Option(None, help="class indices of the reference logit file"),
        target_labels: Optional[Path] = typer.Option(None, help="class indices of the target logit file, to compare "
                                                     "with (optional)"),
        reference_split: str = typer.Option("val", help="split of the reference dataset"),
        split: str = typer.Option("test", help="split of the target dataset"),
        methods: str = typer.Option("confidence,atc,doc,cot", help="comma-separated: confidence, atc, doc, cot"),
        score: str = typer.Option("entropy", help="ATC's score: entropy (ATC-NE) or confidence (max probability)"),
        calibrate: bool = typer.Option(True, help="temperature-scale on the reference first"),
        key: Optional[str] = typer.Option(None, help="tensor name inside .safetensors logit files"),
        limit: Optional[int] = typer.Option(None, help="at most N samples per dataset"),
        batch_size: int = typer.Option(64, help="batch size of the model forward"),
        seed: int = typer.Option(0, help="random seed (subsampling, a bundled model's init)"),
        encoding: Optional[str] = typer.Option(None, help="text encoding of CSV/JSONL data files (default utf-8, "
                                               "read strictly), e.g. latin-1"),
        out: Optional[Path] = typer.Option(None, help="output directory (results.json, PNG); default runs/estimate-<time>"),
        overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
        no_verify: bool = typer.Option(False, "--no-verify", help="skip the adapter's sha256 check (files edited on purpose)"),
    ) -> None:
        """Estimate a model's accuracy on unlabelled data: ATC, COT, DoC and average confidence, fitted on
        labelled reference data (results.json, PNG)."""
        from rich.console import Console

        console = Console(stderr=True)
        chosen = [m.strip() for m in methods.split(",") if m.strip()]
        res = run_estimate(reference, target, out=out or _default_out("estimate"), model=model, adapter=adapter,
                           reference_labels=reference_labels, target_labels=target_labels,
                           reference_split=reference_split, split=split, methods=chosen, score=score,
                           calibrate=calibrate, key=key, limit=limit, batch_size=batch_size, seed=seed,
                           overwrite=overwrite, encoding=encoding, verify=not no_verify)
        line = ", ".join(f"{m} {v:.1f}%" for m, v in res["estimated_accuracy"].items())
        true = f"; true {res['true_accuracy']:.1f}%" if res["true_accuracy"] is not None else ""
        # the data spec printed as given (rich would turn mnist-c:fog:3 into an emoji)
        console.print(f"estimated accuracy on {target} ({res['n_target']} samples): {line}{true}", markup=False,
                      emoji=False)

    @app.command(
        "adapt",
        epilog=("Examples:\n\n"
                "  deltatune adapt --model small-cnn --adapter runs/mnist/adapter --data mnist-c:zoom_blur:3 --method tent\n\n"
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
        encoding: Optional[str] = typer.Option(None, help="text encoding of a CSV/JSONL --data file (default utf-8, "
                                               "read strictly), e.g. latin-1"),
        out: Optional[Path] = typer.Option(None, help="output directory (results.json, PNG); default runs/adapt-<time>"),
        overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
        no_verify: bool = typer.Option(False, "--no-verify", help="skip the adapter's sha256 check (files edited on purpose)"),
    ) -> None:
        """Adapt a model at test time on a data stream; report error (or entropy) over the stream."""
        from rich.console import Console

        from .spec_options import parse_options

        options = parse_options(opt)
        console = Console(stderr=True)
        res = run_adapt(model, data, out=out or _default_out("adapt"), method=method, options=options, adapter=adapter,
                        split=split, batch_size=batch_size, limit=limit, compare=compare, seed=seed,
                        overwrite=overwrite, console=console, encoding=encoding, verify=not no_verify)
        if res["error"] is not None:
            src = f" (unadapted {res['source_error']:.2f}%)" if res["source_error"] is not None else ""
            console.print(f"{method}: error {res['error']:.2f}%{src} over {res['batches']} batches")
        else:
            console.print(f"{method}: mean entropy {res['mean_entropy']:.3f} over {res['batches']} batches (no labels)")
