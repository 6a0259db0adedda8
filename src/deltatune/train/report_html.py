"""One self-contained HTML file over many run directories (``deltatune report``).

Every deltatune job writes ``results.json`` (with its ``"job"``) beside its outputs; training runs
add ``metrics.json`` and PNGs. This module finds those runs, checks that each results.json is what
its job writes, groups the runs by job and renders each group side by side (the figures and tables
come from :mod:`.report_kinds`). The file references nothing outside itself: styles are inline,
there is no script, and every image is a ``data:`` URI, so it can be mailed, attached to a ticket or
opened offline years later.

Runs of different jobs given together are not an error: each job gets its own section, and runs are
compared only with runs of the same job. What is refused (one line each): a path that holds no run,
a results.json that is not JSON or lacks what its job writes, and an ``--out`` that would replace an
input or a file the report did not write.
"""

from __future__ import annotations

import base64
import html
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..core.errors import DeltaError
from ..io.files import atomic_write

RESULTS = "results.json"
GENERATOR = "deltatune report"
MAX_DEPTH = 3  # how deep a directory that is not itself a run is searched for runs
MAX_IMAGE_BYTES = 4 * 1024 * 1024  # a PNG larger than this is listed, not embedded
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ReportError(DeltaError):
    """Input the report cannot use, or an output it must not write (one line, names the fix)."""


@dataclass
class Run:
    """One run directory: its results.json, and metrics.json / PNGs / report.md when present."""

    path: Path
    job: str
    results: dict[str, Any]
    label: str = ""
    metrics: dict[str, Any] | None = None
    images: list[Path] = field(default_factory=list)
    notes: str | None = None  # report.md, shown as text

    def get(self, *keys: str, default: Any = None) -> Any:
        """``results[k1][k2]...``, or ``default`` where a level is missing."""
        value: Any = self.results
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return default
            value = value[key]
        return value


@dataclass
class ReportSummary:
    """What :func:`write_report` wrote: the file, how many runs of each job, its size in bytes and
    the seconds it took (finding, reading, drawing and writing)."""

    path: Path
    runs: int
    kinds: dict[str, int]
    bytes: int
    seconds: float


# -- finding and reading runs ------------------------------------------------------------------
def find_runs(paths: Iterable[str | os.PathLike]) -> list[Run]:
    """The runs under ``paths``, each once, in the order given. A path that is a run (holds a
    results.json) is that run; any other directory is searched ``MAX_DEPTH`` levels deep, not
    descending into the runs it finds (a search's trial directories belong to the search)."""
    found: list[Run] = []
    seen: set[Path] = set()
    for item in paths:
        path = Path(item)
        if not path.exists():
            raise ReportError(f"{path} does not exist; give run directories written by deltatune")
        if path.is_file():
            if path.name == RESULTS:
                path = path.parent
            else:
                raise ReportError(f"{path} is a file; give the run's directory (the one holding "
                                  f"{RESULTS})")
        if (path / RESULTS).is_file():
            runs = [r for r in [_read_run(path, given=True)] if r is not None]
        else:
            runs = [r for r in (_read_run(d) for d in _run_dirs(path, MAX_DEPTH)) if r is not None]
        if not runs:
            raise ReportError(
                f"{path} holds no deltatune run (no {RESULTS} with a \"job\" field in it or "
                f"{MAX_DEPTH} levels below); give directories written by deltatune train, eval, "
                "merge, continual, search, ..."
            )
        for run in runs:
            key = run.path.resolve()
            if key not in seen:
                seen.add(key)
                found.append(run)
    _label(found)
    return found


def _run_dirs(root: Path, depth: int) -> list[Path]:
    out: list[Path] = []
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise ReportError(f"{root} cannot be read ({exc.strerror}); check its permissions"
                          ) from None
    for child in children:
        if (child / RESULTS).is_file():
            out.append(child)
        elif depth > 1:
            out += _run_dirs(child, depth - 1)
    return out


def _read_run(path: Path, given: bool = False) -> Run | None:
    """The run in ``path``; None for a results.json that no job of deltatune wrote (no "job"), and
    for a search's trial found while searching a directory (its search shows it; a trial directory
    given by name is reported as a run of its own)."""
    from .report_kinds import validate

    file = path / RESULTS
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ReportError(f"{file} is not UTF-8 text; give a run directory deltatune wrote"
                          ) from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{file} is not valid JSON (line {exc.lineno}: {exc.msg}); remove the "
                          "directory from the report or rerun its job") from None
    except OSError as exc:
        raise ReportError(f"{file} cannot be read ({exc.strerror}); check its permissions"
                          ) from None
    if not isinstance(data, dict) or not isinstance(data.get("job"), str):
        return None
    if data["job"] == "search-trial" and not given:
        return None
    run = Run(path=path, job=data["job"], results=data)
    problem = validate(run)
    if problem:
        raise ReportError(f"{file} says job {run.job!r} but {problem}; it is not a {run.job} run's "
                          "results: remove the directory from the report or rerun its job")
    metrics = path / "metrics.json"
    if metrics.is_file():
        try:
            loaded = json.loads(metrics.read_text(encoding="utf-8"))
            run.metrics = loaded if isinstance(loaded, dict) else None
        except (OSError, ValueError):
            run.metrics = None  # the curves are left out; results.json still shows
    run.images = sorted(p for p in path.glob("*.png") if p.is_file())
    notes = path / "report.md"
    if notes.is_file():
        run.notes = notes.read_text(encoding="utf-8", errors="replace")[:20000]
    return run


def _label(runs: list[Run]) -> None:
    """Short unique names: the directory name, with its parents' names where two runs share it."""
    labels = [run.path.name for run in runs]
    for depth in range(1, 6):
        labels = ["/".join(run.path.resolve().parts[-depth:]) for run in runs]
        if len(set(labels)) == len(labels):
            break
    else:  # still equal (symlinked copies): number them
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    for run, label in zip(runs, labels):
        run.label = label


# -- writing -----------------------------------------------------------------------------------
def check_out(out: str | os.PathLike, runs: list[Run], inputs: Iterable[str | os.PathLike] = (),
              overwrite: bool = False) -> Path:
    """Refuse an ``--out`` that is a directory, an input, inside a run, or a file the report did not
    write (or one it did, without ``overwrite``)."""
    out = Path(out)
    real = out.resolve() if out.exists() else out.absolute().resolve()
    if out.is_dir():
        raise ReportError(f"--out {out} is a directory; give a file name, e.g. report.html")
    for item in inputs:
        if Path(item).resolve() == real:
            raise ReportError(f"--out {out} is one of the inputs; write the report elsewhere")
    for run in runs:
        if run.path.resolve() in real.parents:
            raise ReportError(f"--out {out} lies inside the run directory {run.path}; write the "
                              "report outside the runs it reads, e.g. report.html")
    if out.exists():
        if not is_report(out):
            raise ReportError(f"--out {out} exists and is not a report deltatune wrote; choose "
                              "another file name")
        if not overwrite:
            raise ReportError(f"--out {out} exists; pass --overwrite to replace it or choose "
                              "another file name")
    return out


def is_report(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(2048)
    except OSError:
        return False
    return f'<meta name="generator" content="{GENERATOR}'.encode() in head


def write_report(paths: Iterable[str | os.PathLike], out: str | os.PathLike, *,
                 title: str | None = None, overwrite: bool = False) -> ReportSummary:
    """Find the runs under ``paths``, render them and write ``out`` atomically (a failure leaves no
    file, or the earlier report, never half a report)."""
    t0 = time.perf_counter()
    paths = list(paths)
    if not paths:
        raise ReportError("give at least one run directory")
    runs = find_runs(paths)
    out = check_out(out, runs, paths, overwrite)
    text = render(runs, title=title)
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    kinds: dict[str, int] = {}
    for run in runs:
        kinds[run.job] = kinds.get(run.job, 0) + 1
    return ReportSummary(out, len(runs), kinds, out.stat().st_size, time.perf_counter() - t0)


# -- HTML ----------------------------------------------------------------------------------------
def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def embed_png(path: Path) -> str:
    """An ``<img>`` holding the PNG at ``path``; a note instead for one too large or not a PNG."""
    try:
        size = path.stat().st_size
        payload = path.read_bytes() if size <= MAX_IMAGE_BYTES else b""
    except OSError:
        return f"<p class=note>{esc(path.name)}: unreadable</p>"
    if size > MAX_IMAGE_BYTES:
        return f"<p class=note>{esc(path.name)}: {size / 1e6:.1f} MB, not embedded</p>"
    if not payload.startswith(PNG_MAGIC):
        return f"<p class=note>{esc(path.name)}: not a PNG file, not embedded</p>"
    return (f'<figure><img alt="{esc(path.name)}" src="{data_uri(payload, "image/png")}">'
            f"<figcaption>{esc(path.name)}</figcaption></figure>")


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;
background:#fff}
header{background:#243b6b;color:#fff;padding:18px 32px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;opacity:.85}main{padding:8px 32px 48px;max-width:1400px}
nav{margin:12px 0}nav a{margin-right:14px}a{color:#2456b3}
h2{border-bottom:2px solid #243b6b;padding-bottom:4px;margin-top:36px}h3{margin:22px 0 8px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #d5dae3;padding:4px 8px;text-align:left;vertical-align:top;
max-width:320px;overflow-wrap:anywhere}.scroll{overflow-x:auto}
th{background:#eef1f6}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr>th:first-child{white-space:nowrap;max-width:none}
tr.diff td{background:#fff6d6}td.best{font-weight:700;color:#0b6b2f}
.figs{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:0 0 12px}figure img{max-width:100%;border:1px solid #e1e4ea}
.figs figure.plot{flex:1 1 520px;max-width:680px}.figs figure.plot img{width:100%}
figcaption{font-size:12px;color:#5a6272}details{margin:6px 0 10px}summary{cursor:pointer}
.note{color:#5a6272;font-size:12px}pre{background:#f6f7f9;padding:8px;overflow:auto;font-size:12px;
white-space:pre-wrap}.matrix td{width:48px;text-align:center}.kinds span{margin-right:12px}
"""


def render(runs: list[Run], *, title: str | None = None) -> str:
    """The report's HTML text for ``runs``: one section per job (training first, then searches,
    evaluations, continual, merges, compression, exports, deployment, generation, others)."""
    from importlib.metadata import PackageNotFoundError, version

    from .report_kinds import TITLES, render_group

    try:
        ver = version("deltatune")
    except PackageNotFoundError:
        ver = "unknown"
    order = list(TITLES)  # known jobs in their usual order, then others as they come
    groups: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: order.index(r.job) if r.job in order else len(order)):
        groups.setdefault(run.job, []).append(run)
    title = title or f"deltatune report: {len(runs)} run{'s' * (len(runs) != 1)}"
    nav = " ".join(f'<a href="#job-{esc(job)}">{esc(job)} ({len(rs)})</a>'
                   for job, rs in groups.items())
    body = [render_group(job, rs) for job, rs in groups.items()]
    made = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta name="generator" content="{GENERATOR} {esc(ver)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><p>written {esc(made)} by deltatune {esc(ver)} from "
        f"{len(runs)} run directories; runs are compared with runs of the same job.</p></header>"
        f"<main><nav>Jobs: {nav}</nav>{''.join(body)}</main></body></html>\n"
    )
