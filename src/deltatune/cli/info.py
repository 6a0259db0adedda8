"""`deltatune info DIR`: what a saved delta directory holds."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command(
        "info",
        epilog="Examples:\n\n  deltatune info runs/bbc/adapter\n\n  deltatune info runs/bbc/adapter --json",
    )
    def info(
        path: Path = typer.Argument(..., help="a delta directory (deltatune or peft layout, or written by `deltatune compress`)"),
        as_json: bool = typer.Option(False, "--json", help="print the raw JSON"),
    ) -> None:
        """Show a delta's format, method, targets, sizes and base-model fingerprint."""
        from ..io import read_adapter_info

        if (path / "compressed.json").is_file() and not (path / "delta.json").is_file():
            from ..compress import describe

            data = describe(path)  # a compressed task vector (full fine-tuning delta)
        else:
            data = read_adapter_info(path)
        if as_json:
            print(json.dumps(data, indent=2, default=str))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"delta at {path}", show_header=False)
        spec = data.get("spec") or {}
        table.add_row("format", f"{data['format']} (version {data.get('format_version', '-')})"
                      + (f", compressed by {data['codec']}" if data.get("packed_bytes") else ""))
        table.add_row("method", str(data.get("method")))
        if data.get("name"):
            table.add_row("name", str(data["name"]))
        options = {k: v for k, v in spec.items() if k not in ("method",) and v not in (None, [], {}, ())}
        table.add_row("options", ", ".join(f"{k}={v}" for k, v in options.items())[:400])
        hosts = data.get("hosts")
        if hosts is not None:
            table.add_row("modules", f"{len(hosts)}: {', '.join(hosts[:4])}{' ...' if len(hosts) > 4 else ''}")
        if data.get("trainable_modules"):
            table.add_row("kept trainable", ", ".join(data["trainable_modules"]))
        if data.get("packed_bytes"):
            by = ", ".join(f"{n} {c}" for c, n in data.get("tensors_by_codec", {}).items())
            table.add_row("tensors", f"{data.get('tensors')} ({by})")
            table.add_row("codec", f"{data['codec']} {data.get('options') or ''}".strip())
            table.add_row("compression", f"{data['original_bytes'] / 1024:.1f} KiB as float32 -> "
                          f"{data['packed_bytes'] / 1024:.1f} KiB packed ({data['ratio']:.1f}x)")
        else:
            table.add_row("tensors", f"{data.get('num_tensors')} ({data.get('num_parameters'):,} parameters)")
        table.add_row("file size", f"{data.get('file_bytes', 0) / 1024:.1f} KiB")
        codec = (data.get("metadata") or {}).get("codec")
        if codec and not data.get("packed_bytes"):
            table.add_row("codec", codec)
        fp = data.get("fingerprint")
        if fp:
            table.add_row("base fingerprint", f"{fp.get('sha256_16')} over {len(fp.get('modules', {}))} modules")
        Console().print(table)
