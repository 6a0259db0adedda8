"""The report's comparison of runs of each job: overlaid curves, result tables, accuracy matrices,
Pareto fronts, timelines. Each renderer reads only what the job writes (results.json, metrics.json,
trials.json, generations.jsonl) and returns HTML blocks; see :mod:`.report_kinds`."""

from __future__ import annotations

import json
from typing import Any

from .report_html import Run, esc
from .report_kinds import figs, figure, fmt, legend, section, smooth, table


# -- training --------------------------------------------------------------------------------------
def _train_view(run: Run) -> dict[str, Any]:
    """A train or demo run as one shape: model, data, method, spec, train, test."""
    if run.job == "demo":
        trained = run.results.get("trained") or {}
        return {"model": "minilm", "data": "bbc-news", "method": "lora", **trained,
                "trainable_params": run.results.get("trainable_params"),
                "trainable_percent": run.results.get("trainable_percent"),
                "seconds": run.results.get("seconds")}
    return run.results


@section("train", "demo")
def _train(runs: list[Run]) -> list[str]:
    views = [_train_view(r) for r in runs]
    metric = next((m.get("metric") for m in (r.metrics for r in runs) if m and m.get("metric")),
                  "accuracy")
    lm = any("perplexity" in (v.get("test") or {}) for v in views)
    test_keys = ["perplexity", "token_accuracy", "loss"] if lm else [metric, "loss"]
    headers = ["run", "model", "data", "method", "trainable", "steps", f"best val {metric}",
               *[f"test {k}" for k in test_keys], "train loss", "train s", "samples/s",
               "peak RSS MB"]
    rows = []
    for run, v in zip(runs, views):
        train, test = v.get("train") or {}, v.get("test") or {}
        pct = v.get("trainable_percent")
        rows.append([run.label, v.get("model"), v.get("data"), v.get("method"),
                     f"{fmt(v.get('trainable_params'))} ({pct:.3g}%)" if pct is not None else None,
                     train.get("steps"), (train.get("best") or {}).get(metric),
                     *[test.get(k) for k in test_keys], train.get("train_loss"),
                     train.get("train_seconds"), train.get("samples_per_second"),
                     train.get("peak_rss_mb")])
    higher = {"accuracy", "token_accuracy", "f1", "reward_accuracy", "exact_match"}
    best = {6: "max" if metric in higher else "min"}
    for i, k in enumerate(test_keys):
        best[7 + i] = "max" if k in higher else "min"
    out = [table(headers, rows, best=best)]
    curves = [(r, r.metrics) for r in runs if r.metrics and r.metrics.get("steps")]
    if curves:
        out.append(figs(
            figure(lambda fig: _loss_curves(fig, curves), caption="training loss per optimizer "
                   "step (running mean), all runs overlaid"),
            figure(lambda fig: _eval_curves(fig, curves, metric),
                   caption=f"validation {metric} at each evaluation"),
        ))
    return out


def _loss_curves(fig, curves: list[tuple[Run, dict]]) -> None:
    ax = fig.add_subplot()
    for run, metrics in curves:
        steps = [s for s in metrics["steps"] if isinstance(s.get("loss"), (int, float))]
        ys, window = smooth([s["loss"] for s in steps])
        ax.plot([s["step"] for s in steps], ys, lw=1.4,
                label=run.label + (f" (mean of {window})" if window > 1 else ""))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    legend(ax)


def _eval_curves(fig, curves: list[tuple[Run, dict]], metric: str) -> None:
    ax = fig.add_subplot()
    for run, metrics in curves:
        evals = [e for e in metrics.get("epochs") or [] if metric in e]
        if evals:
            ax.plot([e["step"] for e in evals], [e[metric] for e in evals], "o-", label=run.label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
    legend(ax)


# -- evaluation, export ----------------------------------------------------------------------------
SETTING_KEYS = {"job", "written_at", "model", "adapter", "data", "split", "seed", "limit",
                "split_fractions", "predictions"}


@section("eval")
def _eval(runs: list[Run]) -> list[str]:
    metrics: list[str] = []
    for run in runs:
        metrics += [k for k, v in run.results.items() if k not in SETTING_KEYS and k not in metrics
                    and isinstance(v, (int, float)) and not isinstance(v, bool)]
    rows = [[r.label, r.get("model"), r.get("adapter"), r.get("data"), r.get("split"),
             *[r.get(k) for k in metrics]] for r in runs]
    best = {5 + i: ("min" if k in ("loss", "perplexity") else "max") for i, k in enumerate(metrics)
            if k != "n" and k != "tokens"}
    out = [table(["run", "model", "adapter", "data", "split", *metrics], rows, best=best)]
    key = next((k for k in ("accuracy", "exact_match", "reward_accuracy", "token_accuracy")
                if k in metrics), None)
    if key and len(runs) > 1:
        out.append(figs(figure(lambda fig: _bars(fig, [r.label for r in runs],
                                                 [r.get(key) for r in runs], key),
                               size=(6.4, 0.6 + 0.35 * len(runs)), caption=f"{key} per run")))
    for run in runs:
        preds = run.get("predictions")
        if isinstance(preds, list) and preds:
            sample = json.dumps(preds[:5], indent=1, default=str, ensure_ascii=False)
            out.append(f"<details><summary>{esc(run.label)}: first {min(5, len(preds))} of "
                       f"{len(preds)} predictions</summary><pre>{esc(sample)}</pre></details>")
    return out


def _bars(fig, labels: list[str], values: list[Any], name: str) -> None:
    ax = fig.add_subplot()
    nums = [v if isinstance(v, (int, float)) else 0.0 for v in values]
    ax.barh(range(len(labels)), nums, color="tab:blue")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(name)
    ax.grid(alpha=0.3, axis="x")


@section("export")
def _export(runs: list[Run]) -> list[str]:
    rows = [[r.label, r.get("adapter"), r.get("num_tensors"), r.get("bytes"),
             r.get("transformers")] for r in runs]
    return [table(["run", "adapter", "tensors", "bytes", "transformers class"], rows)]


# -- compress, merge -------------------------------------------------------------------------------
@section("compress")
def _compress(runs: list[Run]) -> list[str]:
    rows = [[r.label, r.get("source"), r.get("codec"), r.get("options"), r.get("tensors"),
             r.get("original_bytes"), r.get("packed_bytes"), r.get("ratio"), r.get("file_bytes"),
             r.get("seconds")] for r in runs]
    out = [table(["run", "source", "codec", "options", "tensors", "delta bytes", "packed bytes",
                  "ratio", "file bytes", "seconds"], rows, best={7: "max"})]
    if len(runs) > 1:
        out.append(figs(figure(lambda fig: _bars(fig, [f"{r.label} ({r.get('codec')})"
                                                       for r in runs],
                                                 [r.get("ratio") for r in runs],
                                                 "compression ratio (delta bytes / packed bytes)"),
                               size=(6.4, 0.6 + 0.35 * len(runs)))))
    return out


@section("merge")
def _merge(runs: list[Run]) -> list[str]:
    def models(run: Run) -> str:
        items = run.get("models") or []
        return "; ".join(f"{m.get('model')} {fmt(m.get('parameters'))}" if isinstance(m, dict)
                         else str(m) for m in items)

    rows = [[r.label, r.get("method"), r.get("base_model"), models(r), r.get("parameters"),
             r.get("tensors"), r.get("shards"), r.get("total_bytes"), r.get("seconds"),
             r.get("peak_rss_mb")] for r in runs]
    return [table(["run", "method", "base", "models (parameters)", "method parameters",
                   "tensors", "shards", "bytes", "seconds", "peak RSS MB"], rows,
                  best={8: "min", 9: "min"})]


# -- continual -------------------------------------------------------------------------------------
@section("continual")
def _continual(runs: list[Run]) -> list[str]:
    rows = [[r.label, r.get("model"), r.get("stream"), r.get("scenario"), r.get("strategy"),
             r.get("method"), r.get("average_accuracy"), r.get("forgetting"),
             r.get("backward_transfer"), r.get("forward_transfer"), r.get("seconds")]
            for r in runs]
    out = [table(["run", "model", "stream", "scenario", "strategy", "method", "average accuracy",
                  "forgetting", "backward transfer", "forward transfer", "seconds"], rows,
                 best={6: "max", 7: "min", 8: "max", 9: "max"})]
    out.append(figs(figure(lambda fig: _seen_accuracy(fig, runs),
                           caption="average accuracy over the tasks seen so far, after each task")))
    out.append("<h3>Accuracy matrices</h3><p class=note>row: after training on that task; column: "
               "accuracy on that task's test set.</p>")
    out.append(figs(*[_matrix(r) for r in runs]))
    return out


def _seen_accuracy(fig, runs: list[Run]) -> None:
    ax = fig.add_subplot()
    for run in runs:
        matrix = run.results["accuracy_matrix"]
        ys = [sum(row[:i + 1]) / (i + 1) for i, row in enumerate(matrix)]
        ax.plot(range(1, len(ys) + 1), ys, "o-", label=run.label)
    longest = max(len(r.results["accuracy_matrix"]) for r in runs)
    ax.set_xticks(range(1, longest + 1))
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("average accuracy (seen tasks)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    legend(ax)


def _matrix(run: Run) -> str:
    tasks = [str(t) for t in run.results["tasks"]]
    head = "<tr><th>after \\ on</th>" + "".join(f"<th>{esc(t)}</th>" for t in tasks) + "</tr>"
    body = []
    for task, row in zip(tasks, run.results["accuracy_matrix"]):
        cells = []
        for value in row:
            v = value if isinstance(value, (int, float)) else 0.0
            shade = int(255 - 120 * max(0.0, min(1.0, v)))
            cells.append(f'<td style="background:rgb({shade},{255 - (255 - shade) // 3},{shade})">'
                         f"{esc(fmt(value))}</td>")
        body.append(f"<tr><th>{esc(task)}</th>{''.join(cells)}</tr>")
    return (f'<figure><table class="matrix">{head}{"".join(body)}</table><figcaption>'
            f"{esc(run.label)}: {esc(run.get('strategy'))}, {esc(run.get('method'))}"
            "</figcaption></figure>")


# -- search ----------------------------------------------------------------------------------------
def _trials(run: Run) -> list[dict]:
    path = run.path / "trials.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        trials = data.get("trials") if isinstance(data, dict) else None
    except (OSError, ValueError):
        trials = None
    if not isinstance(trials, list):
        trials = list(run.get("pareto") or [])
    return [t for t in trials if isinstance(t, dict)]


@section("search")
def _search(runs: list[Run]) -> list[str]:
    rows = []
    for r in runs:
        best = r.get("best") or {}
        rows.append([r.label, r.get("model"), r.get("data"), r.get("budget"), r.get("trials_done"),
                     len(r.get("pareto") or []), best.get("key"), best.get("params"),
                     best.get("val_accuracy"), best.get("test_accuracy")])
    out = [table(["run", "model", "data", "budget", "trials", "Pareto configs", "best config",
                  "best params", "best val acc", "best test acc"], rows, best={8: "max", 9: "max"})]
    trials = {r.label: _trials(r) for r in runs}
    out.append(figs(figure(lambda fig: _pareto(fig, runs, trials), size=(7.0, 4.0),
                           caption="every trial (dots) and each search's Pareto front (line): "
                           "validation accuracy against trainable delta parameters")))
    for r in runs:
        front = [[p.get("key"), p.get("params"), p.get("val_accuracy"), p.get("test_accuracy"),
                  p.get("trial")] for p in r.get("pareto") or [] if isinstance(p, dict)]
        out.append(f"<h3>Pareto front: {esc(r.label)}</h3>")
        out.append(table(["config", "delta parameters", "val accuracy", "test accuracy", "trial"],
                         front, best={2: "max", 3: "max"}))
    return out


@section("search-trial")
def _search_trial(runs: list[Run]) -> list[str]:
    rows = [[r.label, r.get("key"), r.get("method"), r.get("params"), r.get("steps"),
             r.get("val_accuracy"), r.get("test_accuracy")] for r in runs]
    out = [table(["run", "config", "method", "delta parameters", "steps", "val accuracy",
                  "test accuracy"], rows, best={5: "max", 6: "max"})]
    curves = [(r, r.metrics) for r in runs if r.metrics and r.metrics.get("steps")]
    if curves:
        out.append(figs(figure(lambda fig: _loss_curves(fig, curves),
                               caption="training loss per optimizer step, all trials overlaid")))
    return out


def _pareto(fig, runs: list[Run], trials: dict[str, list[dict]]) -> None:
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        pts = [(t["params"], t["val_accuracy"]) for t in trials[run.label]
               if isinstance(t.get("params"), (int, float))
               and isinstance(t.get("val_accuracy"), (int, float))]
        if pts:
            ax.scatter(*zip(*pts), s=14, alpha=0.45, color=color)
        front = sorted((p["params"], p["val_accuracy"]) for p in run.get("pareto") or []
                       if isinstance(p, dict) and isinstance(p.get("params"), (int, float))
                       and isinstance(p.get("val_accuracy"), (int, float)))
        if front:
            ax.plot(*zip(*front), "o-", color=color, drawstyle="steps-post", label=run.label)
        budget = run.get("budget")
        if isinstance(budget, (int, float)):
            ax.axvline(budget, color=color, ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("trainable delta parameters (log; dotted: budget)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    legend(ax)


# -- deployment: adapt, detect, estimate -----------------------------------------------------------
@section("adapt")
def _adapt(runs: list[Run]) -> list[str]:
    rows = []
    for r in runs:
        err, src = r.get("error"), r.get("source_error")
        both = isinstance(err, (int, float)) and isinstance(src, (int, float))
        gain = src - err if both else None
        rows.append([r.label, r.get("model"), r.get("adapter"), r.get("data"), r.get("method"),
                     r.get("options"), r.get("batches"), src, err, gain, r.get("seconds")])
    out = [table(["run", "model", "adapter", "data", "method", "options", "batches",
                  "source error %", "adapted error %", "error removed (points)", "seconds"], rows,
                 best={8: "min", 9: "max"})]
    if any(isinstance(r.get("curves"), dict) for r in runs):
        out.append(figs(figure(lambda fig: _adapt_timeline(fig, runs), size=(7.0, 3.8),
                               caption="error over the stream, batch after batch: adapted (solid) "
                               "against the unadapted source model (dashed)")))
    return out


def _adapt_timeline(fig, runs: list[Run]) -> None:
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        curves = run.get("curves") or {}
        color = f"C{i % 10}"
        for key, style, label in (("adapted", "-", run.label), ("source", "--", None)):
            ys = curves.get(key)
            if isinstance(ys, list) and ys:
                ax.plot(range(1, len(ys) + 1), ys, style, color=color, label=label, lw=1.4)
    ax.set_xlabel("batch")
    ax.set_ylabel("error % (running)")
    ax.grid(alpha=0.3)
    legend(ax)


@section("detect")
def _detect(runs: list[Run]) -> list[str]:
    rows = []
    for r in runs:
        streamed = isinstance(r.get("history"), list)
        rows.append([r.label, r.get("reference"), r.get("target"), r.get("test"), r.get("alpha"),
                     r.get("n_reference"), r.get("n_target"),
                     r.get("min_p_value") if streamed else r.get("p_value"),
                     f"{r.get('drift_windows')} of {r.get('windows')} windows" if streamed
                     else r.get("drift")])
    out = [table(["run", "reference", "target", "test", "alpha", "n reference", "n target",
                  "p-value (min over windows)", "drift"], rows)]
    if any(isinstance(r.get("history"), list) for r in runs):
        out.append(figs(figure(lambda fig: _drift_timeline(fig, runs), size=(7.0, 3.8),
                               caption="p-value of each window along the target stream; red: "
                               "drift detected (p below alpha, dotted)")))
    return out


def _drift_timeline(fig, runs: list[Run]) -> None:
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        hist = [h for h in run.get("history") or [] if isinstance(h, dict)
                and isinstance(h.get("p_value"), (int, float))]
        if not hist:
            continue
        xs = [h.get("position", j + 1) for j, h in enumerate(hist)]
        ys = [max(h["p_value"], 1e-300) for h in hist]
        ax.plot(xs, ys, "-", color=f"C{i % 10}", label=run.label)
        drift = [(x, y) for x, y, h in zip(xs, ys, hist) if h.get("drift")]
        if drift:
            ax.scatter(*zip(*drift), color="tab:red", zorder=3, s=18)
        alpha = run.get("alpha")
        if isinstance(alpha, (int, float)):
            ax.axhline(alpha, color=f"C{i % 10}", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("target samples seen")
    ax.set_ylabel("p-value")
    ax.grid(alpha=0.3)
    legend(ax)


@section("estimate")
def _estimate(runs: list[Run]) -> list[str]:
    methods: list[str] = []
    for r in runs:
        methods += [m for m in (r.get("estimated_accuracy") or {}) if m not in methods]
    rows = []
    for r in runs:
        est, true = r.get("estimated_accuracy") or {}, r.get("true_accuracy")
        rows.append([r.label, r.get("model"), r.get("reference"), r.get("target"),
                     r.get("n_target"), true, *[est.get(m) for m in methods]])
    out = [table(["run", "model", "reference", "target", "n target", "true accuracy %",
                  *[f"{m} estimate %" for m in methods]], rows)]
    errs = [[r.label, *[abs(r.get("estimated_accuracy")[m] - r.get("true_accuracy"))
                        if isinstance((r.get("estimated_accuracy") or {}).get(m), (int, float))
                        and isinstance(r.get("true_accuracy"), (int, float)) else None
                        for m in methods]] for r in runs]
    if any(isinstance(v, float) for row in errs for v in row[1:]):
        out.append("<p class=note>absolute error of each estimate (points; targets with "
                   "labels only):</p>")
        out.append(table(["run", *methods], errs, best={i + 1: "min" for i in range(len(methods))}))
    return out


# -- generate --------------------------------------------------------------------------------------
@section("generate")
def _generate(runs: list[Run]) -> list[str]:
    rows = [[r.label, r.get("model"), r.get("adapters"), r.get("prompts"), r.get("max_new_tokens"),
             r.get("new_tokens"), r.get("tokens_per_s"), r.get("seconds")] for r in runs]
    out = [table(["run", "model", "adapters", "prompts", "max new tokens", "new tokens",
                  "tokens/s", "seconds"], rows, best={6: "max"})]
    for r in runs:
        path = r.path / "generations.jsonl"
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[:5]
        except OSError:
            continue
        sample = []
        for line in lines:
            try:
                sample.append(json.loads(line))
            except ValueError:
                sample.append(line)
        text = json.dumps(sample, indent=1, ensure_ascii=False, default=str)
        out.append(f"<details><summary>{esc(r.label)}: first {len(sample)} generations</summary>"
                   f"<pre>{esc(text[:6000])}</pre></details>")
    return out
