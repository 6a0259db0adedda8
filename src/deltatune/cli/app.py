"""`deltatune` — one typer app with a subcommand per job.

Each job lives in its own module of this package that defines ``register(app)``; this file only
collects them, so adding a job never edits another job's code. Every job exits non-zero with a
one-line reason on bad input (``DeltaError`` and other ``ValueError``s become ``error: ...``).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_app():
    import typer

    app = typer.Typer(
        name="deltatune",
        help="Adapt frozen pretrained models through parameter deltas: train, combine, shrink, deploy.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    @app.callback()
    def _root() -> None:
        """deltatune: create, train, combine, shrink and maintain parameter deltas of frozen models.

        Every job prints progress, writes results.json beside its outputs, and exits non-zero with a
        one-line reason on bad input. `deltatune JOB --help` shows each job's options and examples.
        """

    package = importlib.import_module(__package__)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name in ("app", "common") or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        if hasattr(module, "register"):
            module.register(app)
    return app


def main(argv: list[str] | None = None) -> int:
    from .common import run_cli

    return run_cli(build_app(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
