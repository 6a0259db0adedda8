"""Reports of a config search: the Pareto front (PNG), a markdown table and ``trials.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io.files import atomic_write, save_figure, write_json


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows not dominated in (higher ``val_accuracy``, fewer ``params``), fewest parameters
    first."""
    front = [r for r in rows if not any(
        o["val_accuracy"] >= r["val_accuracy"] and o["params"] <= r["params"]
        and (o["val_accuracy"] > r["val_accuracy"] or o["params"] < r["params"]) for o in rows)]
    unique = {
        (r["key"]): r for r in sorted(front, key=lambda r: r["trial"], reverse=True)
    }  # one row per config
    return sorted(unique.values(), key=lambda r: (r["params"], -r["val_accuracy"]))


def markdown_table(rows: list[dict[str, Any]], budget: int) -> str:
    lines = [
        f"Pareto front (budget {budget:,} trainable delta parameters; head not counted)",
        "",
        "| config | delta parameters | % of budget | val accuracy | test accuracy | trial |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['key']} | {r['params']:,} | {100 * r['params'] / budget:.1f} | "
            f"{r['val_accuracy']:.4f} | {r.get('test_accuracy', float('nan')):.4f} | {r['trial']} |"
        )
    return "\n".join(lines) + "\n"


def plot_front(
    rows: list[dict[str, Any]], front: list[dict[str, Any]], budget: int, path: Path
) -> Path:
    """All trials (grey) and the Pareto front (line), parameters on a log axis, the budget
    dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter(
        [r["params"] for r in rows],
        [r["val_accuracy"] for r in rows],
        c="0.6",
        s=18,
        label="trials",
    )
    ax.plot(
        [r["params"] for r in front],
        [r["val_accuracy"] for r in front],
        "o-",
        c="tab:red",
        label="Pareto front",
    )
    for r in front:
        ax.annotate(
            r["key"].split(" @")[0],
            (r["params"], r["val_accuracy"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.axvline(budget, ls="--", c="k", lw=1, label="budget")
    ax.set_xscale("log")
    ax.set_xlabel("trainable delta parameters")
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def summarise(study: Any, setup: Any, out: Path) -> dict[str, Any]:
    """Write ``trials.json``, ``pareto.md`` and ``pareto.png`` in ``out``; return the summary."""
    import optuna

    rows = []
    for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]):
        rows.append(
            {
                "trial": t.number,
                **{k: v for k, v in t.user_attrs.items()},
                "val_accuracy": t.values[0],
                "params": int(t.values[1]),
            }
        )
    front = pareto_front(rows)
    best = max(rows, key=lambda r: (r["val_accuracy"], -r["params"])) if rows else None
    write_json(out / "trials.json", {"budget": setup.budget, "trials": rows})
    table = markdown_table(front, setup.budget)
    atomic_write(out / "pareto.md", lambda tmp: Path(tmp).write_text(table))
    png = plot_front(rows, front, setup.budget, out / "pareto.png") if rows else None
    return {"job": "search", "model": setup.model, "data": setup.data, "budget": setup.budget,
            "trials_done": len(rows), "pareto": front, "best": best, "table": table,
            "pareto_png": str(png) if png else None, "trials_json": str(out / "trials.json")}
