"""`deltatune score`: one out-of-distribution score per input (MSP, energy, Mahalanobis, kNN, ViM),
fitted on reference data; the fitted scorer is saved (safetensors + JSON) for later runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from .common import CLIError, output_job, prepare_out, write_results
from .deploy_inputs import (
    data_batches,
    default_out,
    is_feature_file,
    load_entry,
    pyplot,
    read_features,
    save_plot,
)


def _file_representations(path: str, needs: tuple[str, ...], key: Optional[str]):
    """(features, logits) from a feature file: features for feature scores, logits for msp/energy;
    ViM needs the model's head, so it cannot score files."""
    t = read_features(Path(path), key).double()
    t = t.reshape(-1, 1) if t.dim() == 1 else t.reshape(len(t), -1)
    if "head" in needs:
        raise CLIError("vim reads the model's head; pass --model with datasets, not feature files")
    if "features" in needs and "logits" in needs:
        raise CLIError("this score needs features and logits; pass --model with datasets")
    return (t, None) if "features" in needs else (None, t)


@output_job("score")
def run_score(
    inputs: str,
    *,
    out: Path,
    reference: Optional[str] = None,
    method: str = "energy",
    options: Optional[dict] = None,
    scorer_dir: Optional[Path] = None,
    model: Optional[str] = None,
    adapter: Optional[Path] = None,
    layer: Optional[str] = None,
    reference_labels: Optional[Path] = None,
    reference_split: str = "val",
    split: str = "test",
    quantile: float = 0.95,
    key: Optional[str] = None,
    limit: Optional[int] = None,
    batch_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    encoding: Optional[str] = None,
    verify: bool = True,
) -> dict[str, Any]:
    import numpy as np
    import torch

    from .. import deploy as dd
    from ..deploy.ood import SCORES, represent

    files = is_feature_file(inputs)
    if scorer_dir is None and reference is None:
        raise CLIError("give --reference (in-distribution data to fit on) or --scorer DIR (a "
                       "scorer saved by an earlier run)")
    if reference is not None and is_feature_file(reference) != files:
        raise CLIError("--reference and --inputs must both be feature files or both datasets")
    if not files and model is None:
        raise CLIError("datasets need --model to compute scores; or pass .npy/.safetensors "
                       "feature (or logit) files")
    rule_name = method
    if scorer_dir is not None:
        scorer = dd.OODScorer.load(scorer_dir)
        rule_name = scorer.method
    rule = SCORES.get(rule_name)
    entry = None
    t0 = time.time()
    ref_f = ref_z = None
    if files:
        x_f, x_z = _file_representations(inputs, rule.needs, key)
        if reference is not None and scorer_dir is None:
            ref_f, ref_z = _file_representations(reference, rule.needs, key)
    else:
        torch.manual_seed(seed)  # a bundled model built from scratch gets a reproducible init
        entry = load_entry(model, adapter, verify)
        needs = tuple(set(rule.needs) | {"logits"})
        if reference is not None and scorer_dir is None:
            ref_f, ref_z = represent(entry.model, data_batches(
                reference, entry, reference_split, batch_size, limit, seed, encoding), needs,
                layer=layer)
        x_f, x_z = represent(entry.model, data_batches(
            inputs, entry, split, batch_size, limit, seed, encoding), needs, layer=layer)
    if scorer_dir is None:
        labels = read_features(reference_labels).long().flatten() if reference_labels else None
        if "labels" in rule.needs and files and labels is None:
            raise CLIError(f"{method} on feature files needs --reference-labels (class "
                           "indices of the reference, .npy/.safetensors)")
        head = None
        if "head" in rule.needs:
            from ..deploy.ood import head_of

            head = head_of(entry.model, layer)
        scorer = dd.OODScorer.fit_representations(
            method, features=ref_f, logits=ref_z, labels=labels, head=head, layer=layer,
            quantile=quantile, **(options or {}))
    scores = scorer.score_representations(x_f, x_z)  # checked before anything is written
    ref_scores = scorer.reference_scores  # out-of-sample; None for a loaded scorer
    out = prepare_out(out, overwrite, inputs=[inputs, reference, model, adapter, scorer_dir,
                                              reference_labels])
    scorer.save(out / "scorer")
    from ..io.files import atomic_write

    values = scores.numpy().astype(np.float64)

    def write_npy(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save would append .npy to the temp name
            np.save(fh, values)

    atomic_write(out / "scores.npy", write_npy)
    flagged = scores > scorer.threshold
    q = torch.quantile(scores, torch.tensor([0.05, 0.5, 0.95], dtype=scores.dtype)).tolist()
    results = {
        "job": "score", "inputs": inputs, "reference": reference, "model": model,
        "adapter": str(adapter) if adapter else None, "scorer": scorer.to_dict(),
        "loaded_scorer": str(scorer_dir) if scorer_dir else None,
        "n_inputs": len(scores), "flagged": int(flagged.sum()),
        "flagged_fraction": float(flagged.double().mean()),
        "score_quantiles": {"5%": q[0], "50%": q[1], "95%": q[2]},
        "auroc_vs_reference": (dd.auroc(ref_scores, scores) if ref_scores is not None else None),
        "seconds": time.time() - t0,
    }
    _plot_scores(out / "scores.png", scores, ref_scores, scorer)
    write_results(out, results)
    return results


def _plot_scores(path: Path, scores, ref_scores, scorer) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    lo = float(min(scores.min(), ref_scores.min() if ref_scores is not None else scores.min()))
    hi = float(max(scores.max(), ref_scores.max() if ref_scores is not None else scores.max()))
    bins = 50 if hi > lo else 1
    if ref_scores is not None:
        ax.hist(ref_scores.numpy(), bins=bins, range=(lo, hi), alpha=0.5, density=True,
                color="tab:blue", label="reference")
    ax.hist(scores.numpy(), bins=bins, range=(lo, hi), alpha=0.5, density=True,
            color="tab:orange", label="inputs")
    ax.axvline(scorer.threshold, color="red", ls="--",
               label=f"threshold ({100 * scorer.quantile:.0f}% of reference)")
    ax.set(xlabel=f"{scorer.method} score (higher = more unusual)", ylabel="density")
    ax.legend(fontsize=8)
    save_plot(fig, path)


def register(app: typer.Typer) -> None:
    @app.command(
        "score",
        help="Score each input for being out-of-distribution (msp, energy, mahalanobis, knn, vim); "
        "saves the fitted scorer, scores.npy, a PNG and results.json.",
        epilog=(
            "Examples:\n\n"
            "  deltatune score --model minilm --adapter runs/airlines/adapter --reference "
            "tweet-sentiment:airlines --inputs bbc-news-text --method knn --out runs/ood\n\n"
            "  deltatune score --model minilm --adapter runs/airlines/adapter --scorer "
            "runs/ood/scorer --inputs tweet-sentiment:nfl\n\n"
            "  deltatune score --reference ref_feats.npy --inputs new_feats.npy --method knn "
            "--opt k=5"
        ),
    )
    def score(
        inputs: str = typer.Option(..., help="data to score: a dataset name with --model, or a "
                                   "feature/logit file"),
        reference: Optional[str] = typer.Option(
            None, help="in-distribution data the scorer is fitted on (same kind as --inputs)"),
        method: str = typer.Option("energy", help="msp | energy | mahalanobis | knn | vim"),
        opt: list[str] = typer.Option(
            [], "--opt", help="score option as KEY=VALUE (repeatable), e.g. --opt k=5"),
        scorer: Optional[Path] = typer.Option(
            None, help="a scorer directory saved by an earlier run (instead of --reference)"),
        model: Optional[str] = typer.Option(None, help="model name, to score datasets"),
        adapter: Optional[Path] = typer.Option(None, help="a saved delta to load into --model"),
        layer: Optional[str] = typer.Option(
            None, help="features = input of this module (default: the last Linear)"),
        reference_labels: Optional[Path] = typer.Option(
            None, help="class indices of a reference feature file (mahalanobis)"),
        reference_split: str = typer.Option("val", help="split of the reference dataset"),
        split: str = typer.Option("test", help="split of the scored dataset"),
        quantile: float = typer.Option(
            0.95, help="flag inputs above this quantile of the reference scores"),
        key: Optional[str] = typer.Option(None, help="tensor name inside .safetensors files"),
        limit: Optional[int] = typer.Option(None, help="at most N samples per dataset"),
        batch_size: int = typer.Option(64, help="batch size of the model forward"),
        seed: int = typer.Option(0, help="random seed"),
        encoding: Optional[str] = typer.Option(
            None, help="text encoding of CSV/JSONL data files (default utf-8), e.g. latin-1"),
        out: Optional[Path] = typer.Option(
            None, help="output directory; default runs/score-<time>"),
        overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
        no_verify: bool = typer.Option(False, "--no-verify",
                                       help="skip the adapter's sha256 check"),
    ) -> None:
        from rich.console import Console

        from .spec_options import parse_options

        res = run_score(
            inputs, out=out or default_out("score"), reference=reference, method=method,
            options=parse_options(opt), scorer_dir=scorer, model=model, adapter=adapter,
            layer=layer, reference_labels=reference_labels, reference_split=reference_split,
            split=split, quantile=quantile, key=key, limit=limit, batch_size=batch_size,
            seed=seed, overwrite=overwrite, encoding=encoding, verify=not no_verify,
        )
        auroc = res["auroc_vs_reference"]
        Console(stderr=True).print(
            f"{res['scorer']['method']}: {res['flagged']} of {res['n_inputs']} inputs above the "
            f"threshold ({100 * res['flagged_fraction']:.1f}%)"
            + (f"; AUROC vs the reference {auroc:.3f}" if auroc is not None else ""),
            markup=False, emoji=False)
