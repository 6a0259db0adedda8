"""`deltatune report`: one self-contained HTML file comparing run directories side by side."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command(
        "report",
        help="Compare run directories in one self-contained HTML file: settings, learning curves, "
        "accuracy tables, continual matrices, Pareto fronts, merge/compression tables, "
        "TTA and drift timelines.",
        epilog=(
            "Examples:\n\n"
            "  deltatune report runs/bbc-r4 runs/bbc-r8 --out report.html\n\n"
            "  deltatune report runs/ --out runs.html     (every run found in runs/, 3 levels deep)"
            "\n\n"
            "  deltatune report runs/search runs/cl-replay runs/cl-ewc --out study.html --title "
            "'LoRA study' --overwrite\n\n"
            "Any job's output directory can be given (train, eval, export, compress, merge, "
            "continual, search, adapt, detect, estimate, generate, demo); runs are compared with "
            "runs of the same job, each job in its own section. The file needs no network: styles "
            "are inline, there is no script, images are embedded as data: URIs."
        ),
    )
    def report(
        runs: List[Path] = typer.Argument(
            ..., help="run directories (each holding results.json), or directories holding runs"
        ),
        out: Path = typer.Option(..., "--out", "-o", help="the HTML file to write"),
        title: Optional[str] = typer.Option(None, "--title", help="the report's heading"),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="replace an existing report (only one deltatune wrote)"
        ),
    ) -> None:
        from ..train.report_html import write_report

        summary = write_report(runs, out, title=title, overwrite=overwrite)
        kinds = ", ".join(f"{n} {job}" for job, n in summary.kinds.items())
        typer.echo(f"report: {summary.runs} runs ({kinds}) -> {summary.path} "
                   f"({summary.bytes / 1024:.0f} KiB, {summary.seconds:.1f} s)")
