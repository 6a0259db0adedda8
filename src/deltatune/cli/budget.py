"""`deltatune allocate`: where a parameter budget should go on a model, from one gradient pass."""

from __future__ import annotations

from typing import Optional

import typer

from .common import CLIError


def run_allocate(model: str, data: str, budget: str, *, method: str = "sensitivity", targets: Optional[str] = None,
                 batches: int = 8, batch_size: int = 16, seed: int = 0):
    """The allocation (no training); every name is checked first."""
    import torch

    from ..budget import allocate_sensitivity, candidate_paths, parse_budget
    from ..data import load_data
    from ..models import load_model
    from ..train.losses import compute_loss, forward, labels_of
    from ..train.config import task_kind

    if method != "sensitivity":
        raise CLIError(f"unknown allocation method {method!r}; available: sensitivity")
    if batches < 1 or batch_size < 1:
        raise CLIError("--batches and --batch-size must be positive")
    train = load_data(data, "train", seed=seed, limit=batches * batch_size)
    entry = load_model(model, num_labels=len(train.label_names) or None)
    count = parse_budget(budget, entry.model)
    head = tuple(entry.head)
    paths = [p for p in candidate_paths(entry.model, targets.split(",") if targets else None)
             if not any(p == h or p.startswith(h + ".") for h in head)]
    kind = task_kind(entry.task)
    torch.manual_seed(seed)
    chunks = [entry.collate(train.examples[i:i + batch_size]) for i in range(0, len(train), batch_size)]
    loss = lambda m, b: compute_loss(forward(m, b), labels_of(b, kind), entry.task)  # noqa: E731
    return allocate_sensitivity(entry.model, chunks, count, loss, paths=paths)


def register(app: typer.Typer) -> None:
    @app.command(
        "allocate",
        epilog=("Examples:\n\n  deltatune allocate --model minilm --data tweet-sentiment --budget 0.5%\n\n"
                "  deltatune allocate --model minilm --data bbc-news --budget 50000 --targets query,key,value,dense\n\n"
                "Prints one line per candidate matrix: its share of the sensitivity, and the LoRA rank or the number "
                "of sparse entries it gets. Nothing is trained."),
    )
    def allocate(
        model: str = typer.Option(..., "--model", "-m", help="bundled model name or a transformers directory"),
        data: str = typer.Option(..., "--data", "-d", help="data set whose gradients score the weights"),
        budget: str = typer.Option(..., "--budget", "-b", help="trainable parameters: 0.5% of the model, or a count"),
        method: str = typer.Option("sensitivity", "--method", help="allocation method: sensitivity (SPT-style)"),
        targets: Optional[str] = typer.Option(None, "--targets", help="comma-separated name suffixes (default: every Linear but the head)"),
        batches: int = typer.Option(8, "--batches", help="batches in the gradient pass"),
        batch_size: int = typer.Option(16, "--batch-size"),
        seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Allocate a parameter budget over a model's matrices (LoRA ranks + sparse entries), without training."""
        alloc = run_allocate(model, data, budget, method=method, targets=targets, batches=batches,
                             batch_size=batch_size, seed=seed)
        for line in alloc.lines():
            typer.echo(line)
        typer.echo(f"budget {alloc.budget:,} parameters, allocated {alloc.used:,}")
