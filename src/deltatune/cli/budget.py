"""`deltatune allocate`: where a parameter budget should go on a model (one gradient pass, or an
AdaLoRA warm-up)."""

from __future__ import annotations

from typing import Optional

import typer

from .common import CLIError


def run_allocate(
    model: str,
    data: str,
    budget: str,
    *,
    method: str = "sensitivity",
    targets: Optional[str] = None,
    batches: int = 8,
    batch_size: int = 16,
    seed: int = 0,
    steps: int = 50,
    sparse: bool = False,
):
    """The allocation; every name is checked first. ``sensitivity`` trains nothing; ``adalora``
    allocates while training, so it runs a short AdaLoRA warm-up (``steps`` optimizer steps on
    ``batches`` batches) and reports its final ranks."""
    import torch

    from ..budget import allocate_sensitivity, candidate_paths, parse_budget
    from ..data import load_data
    from ..models import load_model
    from ..train.config import task_kind
    from ..train.losses import compute_loss, forward, labels_of

    if method not in ("sensitivity", "adalora"):
        raise CLIError(f"unknown allocation method {method!r}; available: sensitivity, adalora")
    if batches < 1 or batch_size < 1 or steps < 1:
        raise CLIError("--batches, --batch-size and --steps must be positive")
    train = load_data(data, "train", seed=seed, limit=batches * batch_size)
    entry = load_model(model, num_labels=len(train.label_names) or None)
    if len(train):
        entry.collate(
            [train[0]]
        )  # data the model cannot read (text for an image model): one line, now
    count = parse_budget(budget, entry.model)
    head = tuple(entry.head)
    paths = [p for p in candidate_paths(entry.model, targets.split(",") if targets else None)
             if not any(p == h or p.startswith(h + ".") for h in head)]
    if not paths:
        raise CLIError(
            f"{model} has no layer to allocate a budget to outside its head {list(head)}; pass "
            "--targets naming Linear layers"
        )
    if method == "adalora":
        return _adalora_warmup(
            entry, train, count, paths, steps=steps, batch_size=batch_size, seed=seed
        )
    kind = task_kind(entry.task)
    torch.manual_seed(seed)
    chunks = [
        entry.collate(train.examples[i : i + batch_size]) for i in range(0, len(train), batch_size)
    ]

    def loss(m, b):
        return compute_loss(forward(m, b), labels_of(b, kind), entry.task)

    return allocate_sensitivity(
        entry.model, chunks, count, loss, paths=paths, sparse=sparse
    )


def _adalora_warmup(
    entry, train, budget: int, paths: list[str], *, steps: int, batch_size: int, seed: int
):
    """AdaLoRA on every candidate for ``steps`` steps, pruned to the budget's average rank; its
    ranks."""
    import deltatune as dt

    from ..budget import BudgetError
    from ..budget.adalora import AdaLoRASchedule, allocation_of
    from ..core.host import get_module
    from ..train import TrainConfig, fit

    per_rank = sum(
        sum(get_module(entry.model, p).weight.shape) + 1 for p in paths
    )  # one triplet on every module
    target = budget // per_rank
    if target < 1:
        raise BudgetError(
            f"budget of {budget:,} parameters is smaller than one AdaLoRA triplet on each of the "
            f"{len(paths)} candidates ({per_rank:,}); give a larger budget or fewer --targets"
        )
    spec = dt.AdaLoRA(
        init_r=target + max(1, target // 2),
        target_r=target,
        total_step=steps,
        tinit=steps // 10,
        tfinal=steps // 5,
        targets=tuple(paths),
        trainable_modules=tuple(entry.head),
    )
    dt.attach(entry.model, spec, "adalora")
    schedule = AdaLoRASchedule("adalora")
    cfg = TrainConfig(max_steps=steps, batch_size=batch_size, lr=1e-3, seed=seed, progress=False,
                      eval_each_epoch=False, keep_best=False)
    fit(entry.model, train, entry.collate, cfg, task=entry.task, callbacks=[schedule])
    return allocation_of(entry.model, "adalora", schedule.scores, budget=budget)


def register(app: typer.Typer) -> None:
    @app.command(
        "allocate",
        help=(
            "Allocate a parameter budget over a model's matrices (LoRA ranks, optionally sparse "
            "entries), without training."
        ),
        epilog=(
            "Examples:\n\n"
            "  deltatune allocate --model minilm --data tweet-sentiment --budget 0.5%\n\n"
            "  deltatune allocate --model minilm --data bbc-news --budget 50000 --targets "
            "query,key,value,dense\n\n"
            "  deltatune allocate --model minilm --data tweet-sentiment --budget 0.5% --method "
            "adalora --steps 100\n\n"
            "  deltatune allocate --model minilm --data tweet-sentiment --budget 0.5% --sparse\n\n"
            "Prints one line per candidate matrix: its share of the sensitivity (adalora: of the "
            "kept triplets' importance), and the LoRA rank or the number of sparse entries it "
            "gets. sensitivity trains nothing; adalora allocates during training, so it runs a "
            "short AdaLoRA warm-up of --steps steps."
        ),
    )
    def allocate(
        model: str = typer.Option(
            ..., "--model", "-m", help="bundled model name or a transformers directory"
        ),
        data: str = typer.Option(
            ..., "--data", "-d", help="data set whose gradients score the weights"
        ),
        budget: str = typer.Option(
            ..., "--budget", "-b", help="trainable parameters: 0.5% of the model, or a count"
        ),
        method: str = typer.Option(
            "sensitivity",
            "--method",
            help="allocation method: sensitivity (SPT-style) | adalora (short warm-up)",
        ),
        targets: Optional[str] = typer.Option(
            None,
            "--targets",
            help="comma-separated name suffixes (default: every Linear but the head)",
        ),
        batches: int = typer.Option(8, "--batches", help="batches in the gradient pass"),
        batch_size: int = typer.Option(16, "--batch-size"),
        seed: int = typer.Option(0, "--seed"),
        steps: int = typer.Option(50, "--steps", help="adalora: optimizer steps of the warm-up"),
        sparse: bool = typer.Option(
            False,
            "--sparse",
            help="sensitivity: SPT's split, sparse entries where a matrix has less than a rank-1 "
            "LoRA's worth (default: LoRA ranks only; train sparse entries at a small lr)",
        ),
    ) -> None:
        alloc = run_allocate(model, data, budget, method=method, targets=targets, batches=batches,
                             batch_size=batch_size, seed=seed, steps=steps, sparse=sparse)
        for line in alloc.lines():
            typer.echo(line)
        typer.echo(f"budget {alloc.budget:,} parameters, allocated {alloc.used:,}")
