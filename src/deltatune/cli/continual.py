"""`deltatune continual`: a strategy over a task stream, with the accuracy matrix and forgetting."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from . import train_settings
from .common import CLIError, output_job, prepare_out, write_results


@output_job("continual")
def run_continual(cfg: dict[str, Any], *, console=None) -> dict[str, Any]:
    """The job as a plain function: every name and option is checked before ``out`` is touched."""
    from ..continual import make_strategy, make_stream, plot_matrix, run_stream
    from ..models import load_model
    from ..train import TrainConfig
    from .spec_options import build_spec
    from .train import resolve_targets

    if cfg.get("epochs") is None and cfg.get("max_steps") is None:
        raise CLIError("give --epochs N or --max-steps N (per task)")
    stream = make_stream(
        cfg["stream"],
        limit_train=cfg.get("limit"),
        limit_test=cfg.get("limit_test"),
        seed=cfg.get("seed", 0),
    )
    strategy = make_strategy(cfg["strategy"], **(cfg.get("strategy_options") or {}))
    entry = load_model(cfg["model"], num_labels=len(stream.label_names))
    spec = None
    if cfg["method"] != "full":
        options = dict(cfg.get("method_options") or {})
        if "targets" not in options and "target_regex" not in options:
            targets = resolve_targets(entry.model, cfg["method"], entry.default_targets)
            if targets:
                options["targets"] = targets
        spec = build_spec(cfg["method"], options)
    strategy.validate(spec)
    tc = TrainConfig(
        epochs=cfg.get("epochs") or 1,
        max_steps=cfg.get("max_steps"),
        batch_size=cfg.get("batch_size", 16),
        lr=cfg.get("lr", 1e-3),
        seed=cfg.get("seed", 0),
        progress=False,
        eval_each_epoch=False,
        keep_best=False,
        **train_settings.settings(**(cfg.get("train_settings") or {})),
    )
    if tc.gradient_checkpointing:
        from ..train.memory import require_checkpointing

        require_checkpointing(entry.model)
    track = train_settings.tracker(cfg.get("report_to"), Path(cfg["out"]), run_name="continual",
                                   config={"model": cfg["model"], "stream": cfg["stream"],
                                           "strategy": cfg["strategy"], "method": cfg["method"],
                                           "train": tc.to_dict()})
    out = prepare_out(
        Path(cfg["out"]),
        cfg.get("overwrite", False),
        inputs=[cfg["model"], *_stream_files(cfg["stream"])],
    )
    say = (lambda m: console.print(m)) if console else None
    result = run_stream(
        entry.model,
        entry.collate,
        stream,
        strategy,
        tc,
        spec=spec,
        head=entry.head,
        task_ids=cfg.get("task_ids", False),
        log=say,
    )
    if track:  # after task t (step t + 1): its row of the accuracy matrix, then the summary
        try:
            for t, row in enumerate(result.accuracy_matrix):
                track.log({f"accuracy/{name}": a for name, a in zip(result.tasks, row)}, t + 1)
            track.log({k: v for k, v in result.to_dict().items()
                       if k in ("average_accuracy", "forgetting", "backward_transfer",
                                "forward_transfer")}, len(result.accuracy_matrix))
        finally:
            track.finish()
    png = plot_matrix(result, out / "accuracy_matrix.png")
    results = {
        "job": "continual",
        "model": cfg["model"],
        "stream": cfg["stream"],
        "scenario": stream.scenario,
        "strategy": cfg["strategy"],
        "method": cfg["method"],
        "task_ids": cfg.get("task_ids", False),
        "train": {
            k: v
            for k, v in vars(tc).items()
            if k in ("epochs", "max_steps", "batch_size", "lr", "seed", "grad_accum", "precision",
                     "compile", "device", "gradient_checkpointing")
        },
        **result.to_dict(),
        "plot": str(png),
    }
    write_results(out, results)
    return results


def _stream_files(stream: str) -> list[str]:
    """The user's files a stream spec names (``my.csv@task``, ``a.csv;b.csv``): inputs --out must
    not hold."""
    import re

    return [p for p in re.split(r"[@;,]", stream) if p and Path(p).exists()]


def register(app: typer.Typer) -> None:
    @app.command(
        "continual",
        epilog=(
            "Examples:\n\n"
            "  deltatune continual --model small-cnn --stream split-mnist --strategy replay "
            "--method lora --max-steps 100 --out runs/cl\n\n"
            "  deltatune continual --model minilm --stream tweet-domains --strategy lae --method "
            "lora --epochs 1 --limit 2000 --out runs/lae\n\n"
            "  deltatune continual --model minilm --stream my.csv@0,1;2,3 --strategy ewc --method "
            "lora --max-steps 200 --out runs/mine\n\n"
            "  deltatune continual --model minilm --stream tweet-domains --strategy zscl --opt "
            "reference=tweet-sentiment:other --max-steps 40 --out runs/zscl\n\n"
            "  deltatune continual --model minilm --stream bbc-news-classinc --strategy ranpac "
            "--max-steps 20 --out runs/ranpac\n\n"
            "  deltatune continual --model minilm --stream bbc-news-classinc --strategy l2p "
            "--method prompt --opt top_k=2 --max-steps 40 --out runs/l2p\n\n"
            "  deltatune continual --model minilm --stream tweet-domains --strategy replay "
            "--max-steps 40 --precision bf16 --report-to tensorboard --out runs/bf16\n\n"
            "Streams: split-mnist, bbc-news-classinc (class-incremental), tweet-domains, "
            "mnist-corruptions (domain-incremental), PATH@classes;classes (class-incremental) or "
            "PATH@task[=a,b,...] (one task per value of a task column). Strategies: sequential, "
            "joint, replay, ewc, lwf, lae, zscl, merge, olora, simplecil, aper, ranpac, ease, "
            "l2p, dualprompt, coda-prompt (the prompt pools need --method prompt; options with "
            "--opt KEY=VALUE; see docs/continual.md for which to use). "
            "Writes results.json (accuracy_matrix, average_accuracy, forgetting, "
            "backward_transfer, forward_transfer) and accuracy_matrix.png."
        ),
    )
    def continual(
        model: str = typer.Option(
            ..., "--model", "-m", help="bundled model name or a transformers directory"
        ),
        stream: str = typer.Option(..., "--stream", "-s", help="task stream (see below)"),
        strategy: str = typer.Option(
            "sequential", "--strategy",
            help="continual-learning strategy (simplecil/ranpac for class-incremental text)"
        ),
        method: str = typer.Option(
            "lora", "--method", help="delta method (any deltatune method), or 'full'"
        ),
        rank: Optional[int] = typer.Option(None, "--rank", help="LoRA-family rank"),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="epochs per task"),
        max_steps: Optional[int] = typer.Option(
            None, "--max-steps", help="optimizer steps per task"
        ),
        batch_size: int = typer.Option(16, "--batch-size"),
        lr: float = typer.Option(1e-3, "--lr"),
        limit: Optional[int] = typer.Option(
            None, "--limit", help="training examples drawn per data split (then split by task)"
        ),
        limit_test: Optional[int] = typer.Option(
            None, "--limit-test", help="test examples drawn per data split"
        ),
        task_ids: bool = typer.Option(
            False, "--task-ids", help="evaluate with the task's classes only (task-incremental)"
        ),
        buffer_size: Optional[int] = typer.Option(
            None, "--buffer-size", help="replay: examples kept"
        ),
        lam: Optional[float] = typer.Option(
            None, "--lam", help="ewc/lwf/olora/zscl: penalty weight"
        ),
        opt: list[str] = typer.Option(
            [],
            "--opt",
            help="any strategy option as KEY=VALUE (repeatable), e.g. "
            "--opt reference=tweet-sentiment:other (zscl), --opt momentum=0.99 (lae), "
            "--opt dim=4000 (ranpac)",
        ),
        seed: int = typer.Option(0, "--seed"),
        out: Path = typer.Option(..., "--out", "-o", help="output directory"),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="replace an existing output directory"
        ),
        grad_accum: Optional[int] = train_settings.grad_accum_option(),
        gradient_checkpointing: Optional[bool] = train_settings.checkpointing_option(),
        precision: Optional[str] = train_settings.precision_option(),
        compile_: Optional[bool] = train_settings.compile_option(),
        device: Optional[str] = train_settings.device_option(),
        report_to: Optional[str] = train_settings.report_to_option(),
    ) -> None:
        """Adapt to one task after another with a delta, and measure forgetting."""
        from rich.console import Console

        from .spec_options import parse_options

        options = {
            **parse_options(opt),
            **{k: v for k, v in {"buffer_size": buffer_size, "lam": lam}.items() if v is not None},
        }
        r = run_continual(
            {
                "model": model,
                "stream": stream,
                "strategy": strategy,
                "method": method,
                "method_options": {"r": rank} if rank else {},
                "epochs": epochs,
                "max_steps": max_steps,
                "batch_size": batch_size,
                "lr": lr,
                "limit": limit,
                "limit_test": limit_test,
                "task_ids": task_ids,
                "strategy_options": options,
                "seed": seed,
                "out": out,
                "overwrite": overwrite,
                "train_settings": {"grad_accum": grad_accum, "precision": precision,
                                   "compile": compile_, "device": device,
                                   "gradient_checkpointing": gradient_checkpointing},
                "report_to": report_to,
            },
            console=Console(stderr=True),
        )
        f = r["forgetting"]
        typer.echo(f"{strategy} on {stream}: average accuracy {100 * r['average_accuracy']:.2f}%"
                   + (f", forgetting {100 * f:.2f} pt" if f is not None else "") + f" -> {out}")
