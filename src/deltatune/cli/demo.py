"""`deltatune demo`: the main job on the bundled default — LoRA on MiniLM for BBC News topics."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from .common import output_job, prepare_out, write_results

DEFAULT_OUT = Path("runs/demo")


@output_job("demo")
def run_demo(
    out: Path, epochs: int, limit: Optional[int], seed: int, console, *, overwrite: bool = False
) -> dict:
    """The demo job. ``out`` is replaced only with ``overwrite`` — or when it is the default
    directory and holds an earlier demo, so that ``make demo`` can run again — and only what
    deltatune wrote there."""
    import deltatune as dt

    from ..data import load_data
    from ..io.files import atomic_write
    from ..io.outdir import read_record
    from ..train import evaluate
    from .train import load_trained, run_train

    previous = read_record(out) or {}
    overwrite = overwrite or (Path(out) == DEFAULT_OUT and previous.get("job") == "demo")
    out = prepare_out(Path(out), overwrite)
    t0 = time.time()
    console.rule("[bold]1. train LoRA (r=8 on query,value) on MiniLM for BBC News topics")
    cfg = {
        "model": "minilm", "data": "bbc-news", "method": "lora", "out": str(out),
        "seed": seed, "limit": limit,
        "method_options": {"r": 8, "alpha": 16, "targets": ["query", "value"]},
        "train": {"epochs": epochs, "lr": 1e-3, "batch_size": 16},
    }
    trained = run_train(cfg, console=console)
    acc = trained["test"]["accuracy"]
    console.print(
        f"test accuracy [bold]{acc:.4f}[/] with {trained['trainable_percent']:.3f}% of the "
        "parameters trainable"
    )

    console.rule("[bold]2. reload the saved adapter into a fresh base model")
    entry, _ = load_trained(None, Path(trained["adapter"]))
    test = load_data("bbc-news", "test", seed=seed, limit=limit)
    reloaded = evaluate(entry.model, test, entry.collate, task=entry.task)
    console.print(f"reloaded: accuracy {reloaded['accuracy']:.4f}")

    console.rule("[bold]3. merge the delta into the weights (zero inference overhead)")
    dt.merge(entry.model, unload=True)
    merged = evaluate(entry.model, test, entry.collate, task=entry.task)
    console.print(f"merged: accuracy {merged['accuracy']:.4f}")

    same = abs(reloaded["accuracy"] - acc) < 1e-9 and abs(merged["accuracy"] - acc) < 1e-9
    results = {
        "job": "demo", "test_accuracy": acc, "reloaded_accuracy": reloaded["accuracy"],
        "merged_accuracy": merged["accuracy"], "trainable_percent": trained["trainable_percent"],
        "trainable_params": trained["trainable_params"], "consistent": same,
        "seconds": time.time() - t0, "adapter": trained["adapter"],
    }
    report = out / "report.md"
    atomic_write(
        report,
        lambda tmp: Path(tmp).write_text(
            "# deltatune demo: LoRA on MiniLM for BBC News topics\n\n"
            "| | value |\n"
            "|---|---|\n"
            f"| test accuracy | {acc:.4f} |\n"
            f"| trainable parameters | {trained['trainable_params']:,} "
            f"({trained['trainable_percent']:.3f}%) |\n"
            f"| accuracy after save → reload | {reloaded['accuracy']:.4f} |\n"
            f"| accuracy after merge | {merged['accuracy']:.4f} |\n"
            f"| wall time | {results['seconds']:.0f} s |\n\n"
            f"Adapter: `{trained['adapter']}`; learning curve: `learning_curve.png`; metrics: "
            "`metrics.json`.\n"
        ),
    )
    results.update(trained={k: trained[k] for k in ("train", "test", "spec")})
    write_results(out, results)
    return results


def register(app: typer.Typer) -> None:
    @app.command(
        "demo",
        help=(
            "Train LoRA on MiniLM for BBC News, report test accuracy, save, reload, merge, and "
            "check all agree."
        ),
        epilog="Examples:\n\n"
        "  deltatune demo\n\n"
        "  deltatune demo --epochs 1 --limit 200 --out demo-quick   # a one-minute smoke run",
    )
    def demo(
        out: Path = typer.Option(
            DEFAULT_OUT, help="output directory (the default one is replaced by the next demo)"
        ),
        epochs: int = typer.Option(2, help="training epochs"),
        limit: Optional[int] = typer.Option(
            None, help="use at most N examples per split (quick runs)"
        ),
        seed: int = typer.Option(0, help="random seed"),
        overwrite: bool = typer.Option(
            False, help="replace a non-empty --out that holds an earlier deltatune output"
        ),
    ) -> None:
        from rich.console import Console

        console = Console()
        results = run_demo(out, epochs, limit, seed, console, overwrite=overwrite)
        verdict = "[green]consistent[/]" if results["consistent"] else "[red]MISMATCH[/]"
        console.print(
            f"{verdict}: trained {results['test_accuracy']:.4f}, reloaded "
            f"{results['reloaded_accuracy']:.4f}, merged {results['merged_accuracy']:.4f} in "
            f"{results['seconds']:.0f} s; report: {out / 'report.md'}"
        )
        if not results["consistent"]:
            raise typer.Exit(1)
