"""`deltatune monitor`: watch a stream for drift with an online detector calibrated to an expected
run-time; write the alarms timeline (JSON + PNG) and, optionally, adapt the model on alarm."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from .common import CLIError, output_job, prepare_out, write_results
from .deploy_inputs import (
    data_batches,
    default_out,
    is_feature_file,
    load_entry,
    pyplot,
    read_features,
    save_plot,
)


def _stream_batches(entry, streams: list[str], split: str, batch_size: int, limit, seed,
                    encoding):
    """(segment name, batch) over the stream datasets, one after another, in order."""
    for spec in streams:
        for batch in data_batches(spec, entry, split, batch_size, limit, seed, encoding):
            yield spec, batch


@output_job("monitor")
def run_monitor(
    reference: str,
    streams: list[str],
    *,
    out: Path,
    ert: float = 500,
    window: int = 50,
    detector: str = "mmd",
    model: Optional[str] = None,
    adapter: Optional[Path] = None,
    layer: Optional[str] = None,
    adapt: Optional[str] = None,
    adapt_options: Optional[dict] = None,
    reference_split: str = "val",
    split: str = "test",
    reference_limit: Optional[int] = None,
    limit: Optional[int] = None,
    batch_size: int = 32,
    bootstraps: int = 400,
    key: Optional[str] = None,
    seed: int = 0,
    overwrite: bool = False,
    console=None,
    encoding: Optional[str] = None,
    verify: bool = True,
) -> dict[str, Any]:
    import torch

    from .. import deploy as dd
    from ..deploy.batch import call_model, get_logits, last_linear, tap_input
    from ..deploy.online import ONLINE
    from ..deploy.stream import batch_labels

    if not streams:
        raise CLIError("give at least one --stream")
    files = [is_feature_file(s) for s in (reference, *streams)]
    if any(files) and not all(files):
        raise CLIError("--reference and --stream must all be feature files or all datasets")
    files_mode = all(files)
    if not files_mode and model is None:
        raise CLIError("datasets need --model to compute features; or pass .npy/.safetensors "
                       "feature files")
    if files_mode and adapt:
        raise CLIError("--adapt needs --model and datasets (feature files carry no model)")
    if detector not in ONLINE:
        raise CLIError(f"--detector must be one of {', '.join(ONLINE)}, not "
                       f"{detector!r}")
    if not ert > window:
        raise CLIError(f"--ert {ert:g} is not above --window {window}: the detector cannot alarm "
                       "before its window is full; raise --ert or lower --window")
    if adapt:
        dd.METHODS.get(adapt)  # a misspelt method is refused before any work
    entry = None
    if files_mode:
        ref = read_features(Path(reference), key)
        segments = [(s, read_features(Path(s), key)) for s in streams]
    else:
        torch.manual_seed(seed)  # a bundled model built from scratch gets a reproducible init
        entry = load_entry(model, adapter, verify)
        ref = dd.embed(entry.model, data_batches(reference, entry, reference_split, batch_size,
                                                 reference_limit, seed, encoding), layer=layer)
    t0 = time.time()
    det = dd.online_detector(detector, ref, ert=ert, window=window, n_bootstraps=bootstraps,
                             seed=seed)
    out = prepare_out(out, overwrite, inputs=[reference, *streams, model, adapter])
    stats: list[Optional[float]] = []
    alarms: list[dict[str, Any]] = []
    bounds: list[tuple[str, int]] = []
    errors: list[Optional[float]] = []
    wrong = wrong_source = seen_labels = 0
    wrapper = None

    def consume(feats, name: str) -> None:
        for row in feats.reshape(len(feats), -1):  # one at a time: an alarm resets the window
            ev = det.update(row[None])[0]
            stats.append(ev["statistic"])
            if ev["drift"]:
                alarms.append({"t": len(stats), "segment": name, "statistic": ev["statistic"],
                               "adapting": wrapper is not None})
                det.reset()

    from rich.progress import Progress

    with Progress(console=console, disable=console is None, transient=True) as bar:
        task = bar.add_task("stream", total=None)
        if files_mode:
            for name, feats in segments:
                bounds.append((name, len(stats)))
                feats = feats.reshape(len(feats), -1)
                for i in range(0, len(feats), batch_size):
                    consume(feats[i : i + batch_size], name)
                    bar.advance(task)
        else:
            head = layer or last_linear(entry.model)
            watcher = entry.model  # until adaptation starts, the model itself
            current = None
            for name, batch in _stream_batches(entry, streams, split, batch_size, limit, seed,
                                               encoding):
                if name != current:
                    bounds.append((name, len(stats)))
                    current = name
                # the detector always sees the *unadapted* model's features (``watcher``): an
                # adapted model's features are no longer comparable with the reference
                with tap_input(watcher, head) as seen, torch.no_grad():
                    source_logits = get_logits(call_model(watcher, batch)).detach()
                logits = (get_logits(call_model(wrapper, batch)).detach() if wrapper is not None
                          else source_logits)
                n_alarms = len(alarms)
                consume(seen[0].detach(), name)
                labels = batch_labels(batch)
                if labels is not None:
                    wrong += int((logits.argmax(-1).cpu() != labels.cpu()).sum())
                    wrong_source += int((source_logits.argmax(-1).cpu() != labels.cpu()).sum())
                    seen_labels += len(labels)
                    errors.append(100.0 * wrong / seen_labels)
                if adapt and wrapper is None and len(alarms) > n_alarms:
                    import copy

                    watcher = copy.deepcopy(entry.model)  # frozen copy for the detector
                    wrapper = dd.adapt(entry.model, adapt, **(adapt_options or {}))
                    alarms[-1]["adapted_from_here"] = True
                bar.advance(task)
    if wrapper is not None:
        wrapper.remove(reset=True)
    if not stats:
        raise CLIError("the stream yielded no samples; check --stream, --split and --limit")
    ends = [b for _, b in bounds[1:]] + [len(stats)]
    segments_out = [{"name": n, "start": s, "end": e} for (n, s), e in zip(bounds, ends)]
    results = {
        "job": "monitor", "reference": reference, "streams": streams, "model": model,
        "adapter": str(adapter) if adapter else None, "detector": det.to_dict(),
        "samples": len(stats), "segments": segments_out,
        "alarms": alarms,
        "first_alarm_per_segment": {
            s["name"]: next((a["t"] for a in alarms if s["start"] < a["t"] <= s["end"]), None)
            for s in segments_out},
        "adapt": adapt, "adapt_options": adapt_options or {},
        "running_error": errors[-1] if errors else None,  # of the predictions served
        "source_error": 100.0 * wrong_source / seen_labels if seen_labels else None,
        "timeline": {"statistic": stats, "threshold": det.threshold},
        "seconds": time.time() - t0,
    }
    _plot_timeline(out / "timeline.png", results, errors, batch_size)
    write_results(out, results)
    return results


def _plot_timeline(path: Path, results: dict, errors: list, batch_size: int) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.4))
    stats = results["timeline"]["statistic"]
    # None (window filling after a start or an alarm) -> NaN: a gap in the line
    ax.plot(range(1, len(stats) + 1), [float("nan") if s is None else s for s in stats], lw=0.8,
            marker=".", ms=2,
            color="tab:blue", label=f"{results['detector']['detector']} statistic")
    ax.axhline(results["timeline"]["threshold"], color="red", ls="--", lw=1,
               label=f"threshold (ERT {results['detector']['ert']:g})")
    for i, a in enumerate(results["alarms"]):
        ax.axvline(a["t"], color="red", alpha=0.6, lw=1.2, label="alarm" if i == 0 else None)
    for seg in results["segments"][1:]:
        ax.axvline(seg["start"], color="grey", ls=":", lw=1)
    for seg in results["segments"]:
        ax.annotate(seg["name"], (seg["start"], 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=7, color="grey")
    ax.set(xlabel="stream samples", ylabel="statistic")
    if errors:
        ax2 = ax.twinx()
        ax2.plot([min((i + 1) * batch_size, len(stats)) for i in range(len(errors))], errors,
                 color="tab:green", lw=1, label="running error (%)")
        ax2.set_ylabel("running error (%)", color="tab:green")
    ax.legend(loc="upper left", bbox_to_anchor=(1.1 if errors else 1.01, 1.0), fontsize=7)
    ax.set_title("drift monitor: alarms over the stream", fontsize=9)
    save_plot(fig, path)


def register(app: typer.Typer) -> None:
    @app.command(
        "monitor",
        help="Watch a stream for drift with an online detector (MMD or LSDD) calibrated to an "
        "expected run-time; alarms timeline (JSON + PNG), optional adaptation on alarm.",
        epilog=(
            "Examples:\n\n"
            "  deltatune monitor --model minilm --adapter runs/airlines/adapter --reference "
            "tweet-sentiment:airlines --stream tweet-sentiment:airlines --stream "
            "tweet-sentiment:nfl --limit 400 --ert 500 --out runs/monitor\n\n"
            "  deltatune monitor --model small-cnn --adapter runs/mnist/adapter --reference mnist "
            "--stream mnist-c:brightness:3 --ert 500 --adapt bn\n\n"
            "  deltatune monitor --reference ref_feats.npy --stream live_feats.npy --ert 1000 "
            "--window 100 --detector lsdd"
        ),
    )
    def monitor(
        reference: str = typer.Option(
            ..., help="clean reference: a dataset name with --model, or a feature file"),
        stream: list[str] = typer.Option(
            ..., help="data streamed in order (repeatable: segments one after another)"),
        ert: float = typer.Option(500, help="expected run-time (samples) to a false alarm"),
        window: int = typer.Option(50, help="samples in the sliding test window"),
        detector: str = typer.Option("mmd", help="mmd | lsdd"),
        model: Optional[str] = typer.Option(None, help="model name, to compute features"),
        adapter: Optional[Path] = typer.Option(None, help="a saved delta to load into --model"),
        layer: Optional[str] = typer.Option(
            None, help="features = input of this module (default: the last Linear)"),
        adapt: Optional[str] = typer.Option(
            None, help="test-time adaptation method switched on at the first alarm"),
        opt: list[str] = typer.Option(
            [], "--opt", help="adaptation option as KEY=VALUE (repeatable)"),
        reference_split: str = typer.Option("val", help="split of the reference dataset"),
        split: str = typer.Option("test", help="split of the stream datasets"),
        reference_limit: Optional[int] = typer.Option(None, help="at most N reference samples"),
        limit: Optional[int] = typer.Option(None, help="at most N samples per stream dataset"),
        batch_size: int = typer.Option(32, help="samples per model forward"),
        bootstraps: int = typer.Option(400, help="simulated clean streams for the threshold"),
        key: Optional[str] = typer.Option(None, help="tensor name inside .safetensors files"),
        seed: int = typer.Option(0, help="random seed"),
        encoding: Optional[str] = typer.Option(
            None, help="text encoding of CSV/JSONL data files (default utf-8), e.g. latin-1"),
        out: Optional[Path] = typer.Option(
            None, help="output directory; default runs/monitor-<time>"),
        overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
        no_verify: bool = typer.Option(False, "--no-verify",
                                       help="skip the adapter's sha256 check"),
    ) -> None:
        from rich.console import Console

        from .spec_options import parse_options

        console = Console(stderr=True)
        res = run_monitor(
            reference, list(stream), out=out or default_out("monitor"), ert=ert, window=window,
            detector=detector, model=model, adapter=adapter, layer=layer, adapt=adapt,
            adapt_options=parse_options(opt), reference_split=reference_split, split=split,
            reference_limit=reference_limit, limit=limit, batch_size=batch_size,
            bootstraps=bootstraps, key=key, seed=seed, overwrite=overwrite, console=console,
            encoding=encoding, verify=not no_verify,
        )
        first = ", ".join(f"{k}: {v if v is not None else '-'}"
                          for k, v in res["first_alarm_per_segment"].items())
        console.print(f"{len(res['alarms'])} alarm(s) over {res['samples']} samples; first alarm "
                      f"per segment (sample) {first}", markup=False, emoji=False)
