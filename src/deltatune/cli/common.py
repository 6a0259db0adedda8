"""Shared CLI plumbing: error reporting, output directories, results.json."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..io.files import write_json


class CLIError(ValueError):
    """A bad command-line input; printed as one line, exit status 2."""


def run_cli(app, argv: list[str] | None = None) -> int:
    """Run the typer app; user errors become one line on stderr and a non-zero exit."""
    try:
        app(args=argv, standalone_mode=False)
    except SystemExit as exc:  # typer's own exits (--help, usage errors)
        return int(exc.code or 0)
    except ValueError as exc:  # every deltatune user error is a ValueError
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - click's usage errors (typer bundles its own click)
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            return int(exc.exit_code)
        if type(exc).__name__ == "Abort":
            return 1
        raise
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def prepare_out(out: Path, overwrite: bool, *, resume: bool = False) -> Path:
    """Refuse a non-empty output directory unless --overwrite (or --resume continues it)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a directory path")
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise CLIError(f"--out {out} exists and is not empty; pass --overwrite to replace it or choose another directory")
    if out.exists() and overwrite and not resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_results(out: Path, results: dict[str, Any]) -> Path:
    """Write ``results.json`` beside a job's outputs (atomically)."""
    results = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **results}
    path = Path(out) / "results.json"
    write_json(path, json.loads(json.dumps(results, default=str)))
    return path
