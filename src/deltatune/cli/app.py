"""`deltatune` — one typer app with a subcommand per job.

Each job lives in its own module of this package that defines ``register(app)``; this file only
collects them, so adding a job never edits another job's code. Every job exits non-zero with a
one-line reason on bad input (``DeltaError`` and other ``ValueError``s become ``error: ...``).
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# transformers imports torchao (the quant extra) whenever it is installed, and torchao then logs a
# warning per CUDA kernel library it cannot load here, and torch one per Enum it registers:
# six lines of noise at the top of every job that loads a model, none of them about the user's run.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)


HELP_WIDTH = 120  # columns of --help when stdout is not a terminal


def _help_width() -> None:
    """typer draws --help with rich at the terminal's width, and at 80 columns when stdout is not a
    terminal (``| cat``, a file, CI), which cuts option help into slivers and ends words in "…"; use
    HELP_WIDTH there unless the user set a width (COLUMNS, or typer's TERMINAL_WIDTH)."""
    try:
        import typer.rich_utils as rich_utils
    except ImportError:  # typer without rich: plain click help, which wraps by itself
        return
    if rich_utils.MAX_WIDTH is None and not os.environ.get("COLUMNS") and not sys.stdout.isatty():
        rich_utils.MAX_WIDTH = HELP_WIDTH


def build_app():
    import typer

    _help_width()
    app = typer.Typer(
        name="deltatune",
        help="Adapt frozen pretrained models through parameter deltas: train, combine, shrink, "
        "deploy.",
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
