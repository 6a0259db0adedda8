"""`deltatune search`: multi-objective config search (val accuracy up, trainable parameters
down)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from . import train_settings
from .common import CLIError, output_job, prepare_out, write_results


@output_job("search")
def run_search_job(
    model: str,
    data: str,
    budget: str,
    trials: int,
    out: Path,
    *,
    max_steps: int = 100,
    limit: Optional[int] = None,
    methods: Optional[str] = None,
    positions: Optional[str] = None,
    targets: Optional[str] = None,
    batch_size: int = 16,
    seed: int = 0,
    backend: str = "optuna",
    workers: int = 2,
    resume: bool = False,
    overwrite: bool = False,
    say: Callable[[str], None] | None = None,
    train_options: Optional[dict[str, Any]] = None,
    report_to: Optional[str] = None,
) -> dict[str, Any]:
    """Check everything (names, budget, a non-empty space), then run or continue the study in
    ``out``."""
    from ..budget import parse_budget
    from ..budget.search import (
        SearchSetup,
        SearchSpace,
        candidates,
        check_backend,
        run_search,
        text_trainer,
        uniform_key,
    )
    from ..data import load_data
    from ..models import load_model

    if trials < 1 or max_steps < 1 or workers < 1:
        raise CLIError("--trials, --max-steps and --workers must be positive")
    check_backend(backend)  # a missing backend fails before anything loads
    space_args: dict[str, Any] = {}
    if methods:
        space_args["methods"] = tuple(m.strip() for m in methods.split(",") if m.strip())
    if positions:
        space_args["positions"] = tuple(p.strip() for p in positions.split(",") if p.strip())
    if targets:
        space_args["custom_targets"] = tuple(t.strip() for t in targets.split(",") if t.strip())
    space = SearchSpace(**space_args)
    labels = list(
        getattr(load_data(data, "train", seed=seed, limit=limit), "label_names", []) or []
    )
    entry = load_model(model, num_labels=len(labels) or None)
    count = parse_budget(budget, entry.model)
    cands = candidates(
        entry.model, space, count, tuple(entry.head)
    )  # every candidate over budget: a one-line error here
    setup = SearchSetup(
        model=model,
        data=data,
        budget=count,
        trials=trials,
        max_steps=max_steps,
        limit=limit,
        batch_size=batch_size,
        seed=seed,
        train_options=train_settings.settings(**(train_options or {})) or None,
    )
    track = train_settings.tracker(report_to, Path(out), run_name="search",
                                   config={"model": model, "data": data, "budget": count,
                                           "max_steps": max_steps, **(train_options or {})})
    baseline = uniform_key(cands)  # trained first: the best found is never below it on validation
    out = prepare_out(Path(out), overwrite, resume=resume, inputs=[data, model],
                      keep_on_error=("study.db", "search.json"))  # what --resume continues
    if say:
        parallel = f", {workers} at a time (Ray Tune)" if backend == "ray" else ""
        say(
            f"{len(cands)} configurations fit the budget of {count:,} parameters; {trials} "
            f"trials{parallel}, {max_steps} steps each; study in {out / 'study.db'}"
            + (f"; the first trains the uniform default, {baseline}" if baseline else "")
        )
    summary = run_search(
        setup,
        cands,
        text_trainer(setup, space),
        out,
        resume=resume,
        backend=backend,  # type: ignore[arg-type]
        workers=workers,
        progress=say,
        first=(baseline,) if baseline else (),
    )
    results = {
        **summary,
        "baseline": baseline,
        "space": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(space).items()},
        "candidates": len(cands),
    }
    if track:  # one point per trial (step = trial number), as trials.json holds them
        import json

        try:
            rows = json.loads(Path(results["trials_json"]).read_text()).get("trials", [])
            for row in rows:
                track.log({f"trial/{k}": v for k, v in row.items() if k != "trial"},
                          step=int(row["trial"]))
        finally:
            track.finish()
    write_results(out, results)
    return results


def register(app: typer.Typer) -> None:
    @app.command(
        "search",
        help=(
            "Search delta configurations under a parameter budget: Pareto front of val accuracy vs "
            "parameters."
        ),
        epilog=(
            "Examples:\n\n"
            "  deltatune search --model minilm --data tweet-sentiment --budget 0.5% --trials 20 "
            "--out runs/search\n\n"
            "  deltatune search --model minilm --data bbc-news --budget 50k --trials 8 --max-steps "
            "50 --limit 400 --methods lora,ia3 --out runs/quick\n\n"
            "  deltatune search ... --out runs/search --resume   (continue an interrupted or "
            "longer study)\n\n"
            "  deltatune search ... --backend ray --workers 4   (trials in parallel, local Ray "
            "Tune)\n\n"
            "  deltatune search ... --precision bf16 --report-to mlflow   (every trial in bf16 "
            "autocast; one MLflow point per trial under OUT/tracking/)\n\n"
            "Each trial trains in OUT/trial_N/ (results.json, metrics.json); OUT/study.db holds "
            "the Optuna study, OUT/pareto.png and OUT/pareto.md the Pareto front, OUT/trials.json "
            "every trial."
        ),
    )
    def search(
        model: str = typer.Option(
            ..., "--model", "-m", help="bundled model name or a transformers directory"
        ),
        data: str = typer.Option(..., "--data", "-d", help="data set (train / val / test splits)"),
        budget: str = typer.Option(
            ...,
            "--budget",
            "-b",
            help="most trainable delta parameters: 0.5% of the model, or a count",
        ),
        trials: int = typer.Option(
            ..., "--trials", "-n", help="trials in the study (a resumed study runs up to this many)"
        ),
        out: Path = typer.Option(..., "--out", help="output directory"),
        max_steps: int = typer.Option(100, "--max-steps", help="optimizer steps per trial"),
        limit: Optional[int] = typer.Option(None, "--limit", help="at most N examples per split"),
        methods: Optional[str] = typer.Option(
            None, "--methods", help="comma-separated: lora, adalora, ia3, bottleneck (default: all)"
        ),
        positions: Optional[str] = typer.Option(
            None, "--positions", help="comma-separated: qv, attn, ffn, all (default: all four)"
        ),
        targets: Optional[str] = typer.Option(
            None,
            "--targets",
            help="search only this position: comma-separated module name suffixes",
        ),
        batch_size: int = typer.Option(16, "--batch-size"),
        seed: int = typer.Option(0, "--seed"),
        backend: str = typer.Option(
            "optuna",
            "--backend",
            help="optuna: one trial at a time | ray: --workers trials in parallel (local Ray Tune)",
        ),
        workers: int = typer.Option(
            2, "--workers", help="trials run at the same time with --backend ray"
        ),
        resume: bool = typer.Option(False, "--resume", help="continue the study in --out"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out"),
        grad_accum: Optional[int] = train_settings.grad_accum_option(),
        gradient_checkpointing: Optional[bool] = train_settings.checkpointing_option(),
        precision: Optional[str] = train_settings.precision_option(),
        compile_: Optional[bool] = train_settings.compile_option(),
        device: Optional[str] = train_settings.device_option(),
        report_to: Optional[str] = train_settings.report_to_option(),
    ) -> None:
        results = run_search_job(
            model,
            data,
            budget,
            trials,
            out,
            max_steps=max_steps,
            limit=limit,
            methods=methods,
            positions=positions,
            targets=targets,
            batch_size=batch_size,
            seed=seed,
            backend=backend,
            workers=workers,
            resume=resume,
            overwrite=overwrite,
            say=typer.echo,
            train_options={"grad_accum": grad_accum, "precision": precision, "compile": compile_,
                           "device": device, "gradient_checkpointing": gradient_checkpointing},
            report_to=report_to,
        )
        typer.echo(results["table"].rstrip())
        best = results["best"]
        if best:
            typer.echo(
                f"best: {best['key']} val accuracy {best['val_accuracy']:.4f} with "
                f"{best['params']:,} parameters; plot {results['pareto_png']}"
            )
