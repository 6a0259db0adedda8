"""`deltatune estimate`: a model's accuracy on unlabelled data, from estimators (ATC, DoC, COT,
average confidence) fitted on labelled reference data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from .common import CLIError, output_job, prepare_out, write_results
from .deploy_inputs import (
    MIN_ESTIMATE_REFERENCE,
    MIN_ESTIMATE_TARGET,
    both_files,
    data_batches,
    default_out,
    load_entry,
    pyplot,
    read_features,
    save_plot,
    warn_few,
)


def model_logits(entry, loader) -> tuple[Any, Any]:
    """Logits of ``entry.model`` over ``loader`` and the batches' labels (None when the data has
    none), in one pass over the data."""
    import torch

    from .. import deploy as dd

    labels: list = []

    def batches():
        for batch in loader:
            y = dd.batch_labels(batch)
            labels.append(None if y is None else torch.as_tensor(y).long().cpu().flatten())
            yield batch

    try:
        logits = dd.embed(entry.model, batches(), outputs=True, softmax=False)
    except dd.DeployError:
        if not labels:
            raise CLIError(
                "the data yielded no samples; check the dataset name, --split and --limit"
            ) from None
        raise
    return logits, (torch.cat(labels) if all(y is not None for y in labels) else None)


def _read_labels(path: Optional[Path], n: int, what: str):
    if path is None:
        return None
    y = read_features(path).flatten()
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise CLIError(f"{path} holds non-integer values; {what} labels must be class indices")
    if y.numel() != n:
        raise CLIError(
            f"{path} holds {y.numel()} labels for {n} {what} samples; give one label per row"
        )
    return y.long()


@output_job("estimate")
def run_estimate(
    reference: str,
    target: str,
    *,
    out: Path,
    model: Optional[str] = None,
    adapter: Optional[Path] = None,
    reference_labels: Optional[Path] = None,
    target_labels: Optional[Path] = None,
    reference_split: str = "val",
    split: str = "test",
    methods: Optional[list[str]] = None,
    score: str = "entropy",
    calibrate: bool = True,
    key: Optional[str] = None,
    limit: Optional[int] = None,
    batch_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    encoding: Optional[str] = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Fit the estimators on labelled reference outputs; estimate the target's accuracy without its
    labels."""
    from .. import deploy as dd
    from ..deploy.accuracy import ESTIMATES

    methods = list(methods or ESTIMATES)
    unknown = [m for m in methods if m not in ESTIMATES]
    if unknown:
        raise CLIError(
            f"unknown estimate {unknown[0]!r} in --methods; choose from {', '.join(ESTIMATES)}"
        )
    if score not in ("entropy", "confidence"):
        raise CLIError(f"--score must be entropy or confidence, not {score!r}")
    if both_files(reference, target, model, "logit"):
        if reference_labels is None:
            raise CLIError(
                "logit files need --reference-labels (the reference's class indices, "
                ".npy/.safetensors)"
            )
        ref_z, tgt_z = read_features(Path(reference), key), read_features(Path(target), key)
        ref_y = _read_labels(reference_labels, len(ref_z), "reference")
        tgt_y = _read_labels(target_labels, len(tgt_z), "target")
    else:
        import torch

        if reference_labels is not None or target_labels is not None:
            raise CLIError(
                "--reference-labels/--target-labels go with logit files; datasets bring their own "
                "labels"
            )
        torch.manual_seed(
            seed
        )  # before the model: a bundled model built from scratch gets a reproducible init
        entry = load_entry(model, adapter, verify)
        ref_z, ref_y = model_logits(
            entry,
            data_batches(reference, entry, reference_split, batch_size, limit, seed, encoding),
        )
        tgt_z, tgt_y = model_logits(
            entry, data_batches(target, entry, split, batch_size, limit, seed, encoding)
        )
        if ref_y is None:
            raise CLIError(
                f"the reference {reference!r} ({reference_split} split) has no labels; the "
                "estimators are fitted on labelled reference data"
            )
    if ref_z.dim() != 2 or tgt_z.dim() != 2 or ref_z.shape[1] != tgt_z.shape[1]:
        raise CLIError(
            f"reference and target logits must be (samples, classes) with the same classes, got "
            f"{tuple(ref_z.shape)} and {tuple(tgt_z.shape)}"
        )
    classes = int(ref_z.shape[1])
    # the fit checks the reference labels; the target's are only compared with, so they are checked
    # here
    if tgt_y is not None and len(tgt_y) and (int(tgt_y.min()) < 0 or int(tgt_y.max()) >= classes):
        bad = int(tgt_y.min()) if int(tgt_y.min()) < 0 else int(tgt_y.max())
        raise CLIError(
            f"--target-labels must be class indices in [0, {classes - 1}] (the logits have "
            f"{classes} classes); it holds {bad}"
        )
    warn_few(
        len(ref_z), len(tgt_z), (MIN_ESTIMATE_REFERENCE, MIN_ESTIMATE_TARGET), "accuracy estimation"
    )
    t0 = time.time()
    est = dd.fit_accuracy_estimator(ref_z, ref_y, calibrate=calibrate, score=score)
    estimates = est.estimate(tgt_z, methods=methods)
    out = prepare_out(
        out, overwrite, inputs=[reference, target, model, adapter, reference_labels, target_labels]
    )  # after the fit: bad labels or logits leave no directory behind
    true = float((tgt_z.argmax(-1) == tgt_y).double().mean()) if tgt_y is not None else None
    results = {
        "job": "estimate",
        "reference": reference,
        "target": target,
        "model": model,
        "adapter": str(adapter) if adapter else None,
        "reference_split": reference_split,
        "split": split,
        "n_reference": len(ref_z),
        "n_target": len(tgt_z),
        "classes": int(ref_z.shape[1]),
        "estimator": est.to_dict(),
        "estimated_accuracy": {m: 100.0 * v for m, v in estimates.items()},
        "true_accuracy": None if true is None else 100.0 * true,
        "seconds": time.time() - t0,
    }
    _plot_estimate(out / "estimate.png", results)
    write_results(out, results)
    return results


# -- plots ----------------------------------------------------------------------------------------
def _plot_estimate(path: Path, results: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    est = results["estimated_accuracy"]
    bars = ax.bar(
        list(est), list(est.values()), color="tab:blue", label="estimated (no target labels)"
    )
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.axhline(
        100 * results["estimator"]["source_accuracy"],
        color="grey",
        ls=":",
        label="reference accuracy",
    )
    if results["true_accuracy"] is not None:
        ax.axhline(results["true_accuracy"], color="red", ls="--", label="true target accuracy")
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title=f"accuracy of {results['target']}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    save_plot(fig, path)


# -- CLI ------------------------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    @app.command(
        "estimate",
        # "\n" where the docstring this help replaced broke its line (`deltatune --help` shows it)
        help=(
            "Estimate a model's accuracy on unlabelled data: ATC, COT, DoC and average confidence, "
            "fitted on\nlabelled reference data (results.json, PNG)."
        ),
        epilog=(
            "Examples:\n\n"
            "  deltatune estimate --model small-cnn --adapter runs/mnist/adapter --reference mnist "
            "--target mnist-c:contrast:3\n\n"
            "  deltatune estimate --model minilm --adapter runs/airlines/adapter --reference "
            "tweet-sentiment:airlines --target tweet-sentiment:apple --methods atc,cot\n\n"
            "  deltatune estimate --reference val_logits.npy --reference-labels val_labels.npy "
            "--target new_logits.npy"
        ),
    )
    def estimate(
        reference: str = typer.Option(
            ..., help="labelled reference: a dataset name with --model, or a logit file"
        ),
        target: str = typer.Option(
            ..., help="the data whose accuracy to estimate (its labels are not used)"
        ),
        model: Optional[str] = typer.Option(None, help="model name, to compute logits of datasets"),
        adapter: Optional[Path] = typer.Option(
            None, help="a saved delta to load into --model first"
        ),
        reference_labels: Optional[Path] = typer.Option(
            None, help="class indices of the reference logit file"
        ),
        target_labels: Optional[Path] = typer.Option(
            None, help="class indices of the target logit file, to compare with (optional)"
        ),
        reference_split: str = typer.Option("val", help="split of the reference dataset"),
        split: str = typer.Option("test", help="split of the target dataset"),
        methods: str = typer.Option(
            "confidence,atc,doc,cot", help="comma-separated: confidence, atc, doc, cot"
        ),
        score: str = typer.Option(
            "entropy", help="ATC's score: entropy (ATC-NE) or confidence (max probability)"
        ),
        calibrate: bool = typer.Option(True, help="temperature-scale on the reference first"),
        key: Optional[str] = typer.Option(None, help="tensor name inside .safetensors logit files"),
        limit: Optional[int] = typer.Option(None, help="at most N samples per dataset"),
        batch_size: int = typer.Option(64, help="batch size of the model forward"),
        seed: int = typer.Option(0, help="random seed (subsampling, a bundled model's init)"),
        encoding: Optional[str] = typer.Option(
            None,
            help="text encoding of CSV/JSONL data files (default utf-8, "
            "read strictly), e.g. latin-1",
        ),
        out: Optional[Path] = typer.Option(
            None, help="output directory (results.json, PNG); default runs/estimate-<time>"
        ),
        overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
        no_verify: bool = typer.Option(
            False, "--no-verify", help="skip the adapter's sha256 check (files edited on purpose)"
        ),
    ) -> None:
        from rich.console import Console

        console = Console(stderr=True)
        chosen = [m.strip() for m in methods.split(",") if m.strip()]
        res = run_estimate(
            reference,
            target,
            out=out or default_out("estimate"),
            model=model,
            adapter=adapter,
            reference_labels=reference_labels,
            target_labels=target_labels,
            reference_split=reference_split,
            split=split,
            methods=chosen,
            score=score,
            calibrate=calibrate,
            key=key,
            limit=limit,
            batch_size=batch_size,
            seed=seed,
            overwrite=overwrite,
            encoding=encoding,
            verify=not no_verify,
        )
        line = ", ".join(f"{m} {v:.1f}%" for m, v in res["estimated_accuracy"].items())
        true = f"; true {res['true_accuracy']:.1f}%" if res["true_accuracy"] is not None else ""
        # the data spec printed as given (rich would turn mnist-c:fog:3 into an emoji)
        console.print(
            f"estimated accuracy on {target} ({res['n_target']} samples): {line}{true}",
            markup=False,
            emoji=False,
        )
