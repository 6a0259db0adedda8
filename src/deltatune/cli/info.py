"""`deltatune info DIR`: what a saved delta directory holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

TASK_FILE = (
    "task.json"  # written beside the adapter by `deltatune train` (read here, never written)
)


def read_task_info(path: Path) -> dict[str, Any]:
    """Base model, task and label names from ``task.json`` beside the adapter ({} when absent); a
    file that does not parse gives ``{"error": ...}`` instead of stopping the report."""
    task_file = path / TASK_FILE
    if not task_file.is_file():
        return {}
    try:
        task = json.loads(task_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return {"error": f"not valid JSON ({exc})"}
    if not isinstance(task, dict):
        return {"error": "should hold a JSON object"}
    labels = task.get("label_names")
    return {"model": task.get("model") if isinstance(task.get("model"), str) else None,
            "task": task.get("task") if isinstance(task.get("task"), str) else None,
            "data": task.get("data") if isinstance(task.get("data"), str) else None,
            "label_names": [str(x) for x in labels] if isinstance(labels, list) else None}


def gather(path: Path, verify: bool = True) -> dict[str, Any]:
    """Everything `info` shows, as one dict; a malformed file is a one-line DeltaFileError, never a
    crash."""
    from ..core.errors import DeltaError, DeltaFileError
    from ..io import read_adapter_info

    try:
        if (path / "compressed.json").is_file() and not (path / "delta.json").is_file():
            from ..compress import describe

            data = describe(path)  # a compressed task vector (full fine-tuning delta)
        else:
            data = read_adapter_info(path, verify=verify)
    except (DeltaError, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001
        # a reader tripping over a malformed file: report it, one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DeltaFileError(
            f"{path} holds a malformed delta file ({type(exc).__name__}: {first}); save it again"
        ) from None
    task = read_task_info(path)
    if task:
        data["task_info"] = task
    return data


def _text(value: Any, limit: int = 400) -> str:
    return str(value)[:limit]


def _rows(data: dict[str, Any]) -> list[tuple[str, str]]:
    get = data.get
    rows = []
    spec = get("spec") if isinstance(get("spec"), dict) else {}
    packed = bool(get("packed_bytes"))
    rows.append(("format", f"{get('format', '?')} (version {get('format_version', '-')})"
                 + (f", compressed by {get('codec')}" if packed else "")))
    rows.append(("method", _text(get("method"))))
    if get("name"):
        rows.append(("name", _text(get("name"))))
    task = get("task_info") or {}
    if task.get("error"):
        rows.append(("task.json", _text(task["error"])))
    if task.get("model"):
        rows.append(("base model", task["model"]))
    if task.get("task"):
        rows.append(("task", task["task"] + (f" on {task['data']}" if task.get("data") else "")))
    if task.get("label_names"):
        labels = task["label_names"]
        rows.append(
            (
                "labels",
                f"{len(labels)}: "
                + _text(", ".join(labels[:10]) + (" ..." if len(labels) > 10 else "")),
            )
        )
    options = {
        k: v for k, v in spec.items() if k not in ("method",) and v not in (None, [], {}, ())
    }
    rows.append(("options", _text(", ".join(f"{k}={v}" for k, v in options.items()))))
    hosts = get("hosts")
    if isinstance(hosts, list):
        rows.append(
            (
                "modules",
                f"{len(hosts)}: {', '.join(map(str, hosts[:4]))}{' ...' if len(hosts) > 4 else ''}",
            )
        )
    if isinstance(get("trainable_modules"), list) and get("trainable_modules"):
        rows.append(("kept trainable", _text(", ".join(map(str, get("trainable_modules"))))))
    if packed:
        codecs = get("tensors_by_codec") if isinstance(get("tensors_by_codec"), dict) else {}
        rows.append(
            ("tensors", f"{get('tensors')} ({', '.join(f'{n} {c}' for c, n in codecs.items())})")
        )
        rows.append(("codec", f"{get('codec')} {get('options') or ''}".strip()))
        try:
            rows.append(("compression", f"{get('original_bytes') / 1024:.1f} KiB as float32 -> "
                         f"{get('packed_bytes') / 1024:.1f} KiB packed ({get('ratio'):.1f}x)"))
        except (TypeError, ValueError):
            rows.append(("compression", "?"))
    else:
        params = get("num_parameters")
        rows.append(
            (
                "tensors",
                f"{get('num_tensors')} ({params:,} parameters)"
                if isinstance(params, int)
                else _text(get("num_tensors")),
            )
        )
    size = get("file_bytes")
    if isinstance(size, (int, float)):
        rows.append(("file size", f"{size / 1024:.1f} KiB"))
    if get("checksum"):
        rows.append(("checksum", str(get("checksum"))))
    metadata = get("metadata") if isinstance(get("metadata"), dict) else {}
    if metadata.get("codec") and not packed:
        rows.append(("codec", _text(metadata["codec"])))
    fp = get("fingerprint")
    if isinstance(fp, dict):
        rows.append(
            (
                "base fingerprint",
                f"{fp.get('sha256_16')} over {len(fp.get('modules') or {})} modules",
            )
        )
    return rows


def register(app: typer.Typer) -> None:
    @app.command(
        "info",
        help=(
            "Show a delta's format, method, base model, labels, targets, sizes and base-model "
            "fingerprint."
        ),
        epilog="Examples:\n\n"
        "  deltatune info runs/bbc/adapter\n\n"
        "  deltatune info runs/bbc/adapter --json",
    )
    def info(
        path: Path = typer.Argument(
            ...,
            help="a delta directory (deltatune or peft layout, or written by `deltatune compress`)",
        ),
        as_json: bool = typer.Option(False, "--json", help="print the raw JSON"),
        no_verify: bool = typer.Option(
            False,
            "--no-verify",
            help="skip the sha256 check of the tensor file (for files edited on purpose)",
        ),
    ) -> None:
        data = gather(path, verify=not no_verify)
        if as_json:
            print(json.dumps(data, indent=2, default=str))
            return
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(title=Text(f"delta at {path}"), show_header=False)
        for key, value in _rows(data):
            table.add_row(key, Text(value))  # Text: label names such as "[PAD]" are not markup
        Console().print(table)
