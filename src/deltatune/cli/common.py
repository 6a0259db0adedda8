"""Shared CLI plumbing: error reporting, output directories, results.json."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..io.files import write_json
from ..io.outdir import claim, output_job  # noqa: F401 - output_job is used by every job module


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
    except (
        OSError
    ) as exc:  # a full disk, a file-size limit, no permission: the job rolled its output back
        print(f"error: {_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - click's usage errors (typer bundles its own click)
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            return int(exc.exit_code)
        if type(exc).__name__ == "Abort":
            return 1
        if type(exc).__name__ == "SafetensorError" and "I/O error" in str(
            exc
        ):  # safetensors' own write error
            print(
                f"error: could not write a safetensors file ({_one_line(exc)}){_DISK_HINT}",
                file=sys.stderr,
            )
            return 1
        raise
    return 0


_DISK_HINT = "; free disk space (or raise the file-size limit) and run the job again"


def _os_error(exc: OSError) -> str:
    """One line for an operating-system error while reading or writing files."""
    import errno

    what = exc.strerror or _one_line(exc)
    where = f": {exc.filename}" if exc.filename else ""
    hint = _DISK_HINT if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
    return f"{what}{where}{hint}"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def prepare_out(out: Path, overwrite: bool, *, resume: bool = False, inputs: Iterable[Any] = (),
                keep_on_error: Iterable[str] = ()) -> Path:
    """Claim ``out`` for the running job (see :mod:`deltatune.io.outdir`): refuse the current or
    home directory and any directory holding an input, lock it, and replace only what deltatune
    wrote there (with ``overwrite``); the job's ``@output_job`` finishes it or rolls it back."""
    return claim(
        out, overwrite=overwrite, resume=resume, inputs=inputs, keep_on_error=keep_on_error
    )


def write_results(out: Path, results: dict[str, Any]) -> Path:
    """Write ``results.json`` beside a job's outputs (atomically)."""
    results = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **results}
    path = Path(out) / "results.json"
    write_json(path, json.loads(json.dumps(results, default=str)))
    return path
