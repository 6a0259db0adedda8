"""The HTML report's section for each job: what its results.json must hold, and how runs of that job
are compared side by side (overlaid figures, tables, the settings that differ).

One renderer per job, registered with :func:`section`; a job with no renderer (a newer job, or one
that writes only a few numbers) gets the generic settings table and its PNGs. Figures are drawn with
matplotlib into SVG and embedded as ``data:`` URIs (each in its own ``<img>``, so the SVGs' internal
ids cannot clash); without matplotlib the tables still show.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Callable

from .report_html import Run, data_uri, embed_png, esc

Renderer = Callable[[list[Run]], list[str]]
_RENDERERS: dict[str, Renderer] = {}
#: job -> the keys its results.json always holds (a results.json without them is not that job's)
REQUIRED: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "demo": ("trained",),
    "continual": ("accuracy_matrix", "tasks"),
    "search": ("pareto",),
    "adapt": ("method",),
    "merge": ("method",),
    "compress": ("codec",),
    "detect": ("test",),
    "estimate": ("estimated_accuracy",),
    "generate": ("model",),
}
TITLES = {  # also the order of the report's sections
    "train": "Training runs", "demo": "Demo runs", "search": "Configuration searches",
    "search-trial": "Search trials", "eval": "Evaluations", "continual": "Continual adaptation",
    "merge": "Merges", "compress": "Compressed deltas", "export": "Exports",
    "adapt": "Test-time adaptation", "detect": "Drift detection",
    "estimate": "Accuracy estimation", "generate": "Generation",
}
#: keys left out of the settings table (shown elsewhere, or too long for a cell)
BULKY = {"written_at", "curves", "history", "accuracy_matrix", "initial_accuracy", "pareto",
         "best", "table", "predictions", "ranks", "space", "trained", "extra", "files"}


def section(*jobs: str) -> Callable[[Renderer], Renderer]:
    def wrap(fn: Renderer) -> Renderer:
        for job in jobs:
            _RENDERERS[job] = fn
        return fn

    return wrap


def validate(run: Run) -> str | None:
    """Why ``run``'s results.json is not what its job writes (None when it is)."""
    missing = [k for k in REQUIRED.get(run.job, ()) if k not in run.results]
    if missing:
        return f"has no {', '.join(repr(k) for k in missing)}"
    if run.job == "train" and not isinstance(run.results["train"], dict):
        return "its 'train' is not an object"
    if run.job == "continual":
        matrix, tasks = run.results["accuracy_matrix"], run.results["tasks"]
        square = isinstance(matrix, list) and isinstance(tasks, list) and all(
            isinstance(row, list) and len(row) == len(tasks) for row in matrix)
        if not square or len(matrix) != len(tasks):
            return "its accuracy_matrix is not one row and one column per task"
    return None


def render_group(job: str, runs: list[Run]) -> str:
    from . import report_jobs  # noqa: F401  (the renderers register themselves when imported)

    title = TITLES.get(job, f"{job} runs")
    parts = [f'<section id="job-{esc(job)}"><h2>{esc(title)} ({len(runs)})</h2>']
    renderer = _RENDERERS.get(job)
    if renderer is not None:
        parts += renderer(runs)
    parts.append(settings_table(runs))
    parts.append(per_run(runs))
    parts.append("</section>")
    return "".join(parts)


# -- building blocks -------------------------------------------------------------------------------
def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, default=str)
        return text if len(text) <= 160 else text[:157] + "..."
    return str(value)


def table(headers: list[str], rows: list[list[Any]], *, best: dict[int, str] | None = None,
          cls: str = "") -> str:
    """An HTML table; ``best`` marks the highest ("max") or lowest ("min") number of a column."""
    marks: dict[int, float] = {}
    for col, how in (best or {}).items():
        nums = [r[col] for r in rows if _is_num(r[col])]
        if len(nums) > 1:
            marks[col] = max(nums) if how == "max" else min(nums)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            kind = "num" if _is_num(value) else ""
            if i in marks and _is_num(value) and value == marks[i]:
                kind += " best"
            cells.append(f'<td class="{kind.strip()}">{esc(fmt(value))}</td>' if kind
                         else f"<td>{esc(fmt(value))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    attr = f' class="{cls}"' if cls else ""
    return f"<div class=scroll><table{attr}><tr>{head}</tr>{''.join(body)}</table></div>"


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flatten(data: dict[str, Any], prefix: str = "", depth: int = 3) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not prefix and key in BULKY:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict) and depth > 1 and value:
            out.update(flatten(value, f"{name}.", depth - 1))
        elif isinstance(value, list) and len(value) > 12:
            out[name] = f"[{len(value)} items]"
        else:
            out[name] = value
    return out


def settings_table(runs: list[Run]) -> str:
    """Every setting and number of results.json (and of metrics.json's training config), one
    column per run; rows that differ between runs come first, highlighted."""
    flat = []
    for run in runs:
        values = flatten(run.results)
        config = (run.metrics or {}).get("config")
        if isinstance(config, dict):
            values.update({f"config.{k}": v for k, v in config.items()})
        flat.append(values)
    keys: list[str] = []
    for values in flat:
        keys += [k for k in values if k not in keys]
    rows = [(k, [v.get(k) for v in flat]) for k in keys]
    differ = [r for r in rows if len({json.dumps(v, default=str) for v in r[1]}) > 1]
    same = [r for r in rows if r not in differ]

    def html_rows(items: list[tuple[str, list[Any]]], cls: str) -> str:
        return "".join(f'<tr class="{cls}"><th>{esc(k)}</th>'
                       + "".join(f"<td>{esc(fmt(v))}</td>" for v in vals) + "</tr>"
                       for k, vals in items)

    head = "<tr><th>setting</th>" + "".join(f"<th>{esc(r.label)}</th>" for r in runs) + "</tr>"
    if len(runs) == 1:
        return (f"<details><summary>All settings and results ({len(rows)})</summary><table>{head}"
                f"{html_rows(rows, '')}</table></details>")
    out = f"<h3>Settings that differ ({len(differ)})</h3>"
    out += f"<table>{head}{html_rows(differ, 'diff')}</table>" if differ else "<p>none</p>"
    if same:
        out += (f"<details><summary>Settings all runs share ({len(same)})</summary><table>{head}"
                f"{html_rows(same, '')}</table></details>")
    return out


def per_run(runs: list[Run]) -> str:
    """Each run's own figures (its PNGs) and notes, folded."""
    parts = []
    for run in runs:
        inner = "".join(embed_png(p) for p in run.images)
        if run.notes:
            inner += f"<pre>{esc(run.notes)}</pre>"
        if not inner:
            continue
        parts.append(f'<details><summary>{esc(run.label)}: its own figures'
                     f'{" and report" if run.notes else ""} <span class=note>({esc(run.path)})'
                     f'</span></summary><div class="figs">{inner}</div></details>')
    return "<h3>Each run's figures</h3>" + "".join(parts) if parts else ""


def figure(draw: Callable[[Any], None], *, size: tuple[float, float] = (6.4, 3.6),
           caption: str = "") -> str:
    """``draw(fig)`` on a new matplotlib figure, embedded as an SVG data URI ('' without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return '<p class=note>matplotlib is not installed: figures left out (pip install ' \
               '"deltatune[cli]")</p>'
    with matplotlib.rc_context({"svg.hashsalt": "deltatune", "svg.fonttype": "none",
                                "font.size": 9}):
        fig = plt.figure(figsize=size)
        try:
            draw(fig)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="svg", metadata={"Date": None})
        finally:
            plt.close(fig)
    src = data_uri(buf.getvalue(), "image/svg+xml")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure class="plot"><img alt="{esc(caption or "figure")}" src="{src}">{cap}</figure>'


def legend(ax) -> None:
    """A legend that stays readable with many runs (two columns, small type)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7 if len(labels) <= 8 else 6, ncol=1 if len(labels) <= 8 else 2)


def figs(*items: str) -> str:
    items = tuple(i for i in items if i)
    return f'<div class="figs">{"".join(items)}</div>' if items else ""


def smooth(values: list[float]) -> tuple[list[float], int]:
    window = max(1, len(values) // 25)
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out, window
