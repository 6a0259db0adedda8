"""Experiment trackers: what TensorBoard, MLflow and the CSV tracker hold equals the run's own
metrics.json / results.json, read back from their files; bad tracker names and missing packages
are one-line errors before --out exists."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

from deltatune.cli.app import main
from deltatune.train import TrainConfig, TrainError, fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_worker as W  # noqa: E402

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def _err(capsys) -> str:
    return capsys.readouterr().err.strip()


def _tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                scalars.setdefault(tag, {})[e.step] = e.value
    return scalars


def _mlflow_scalars(db: Path) -> dict[str, dict[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=db.resolve().as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            for key in run.data.metrics}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)  # TensorBoard stores float32


def test_cli_train_logs_to_tensorboard_mlflow_and_csv_what_results_json_holds(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--model", "small-cnn", "--data", "mnist", "--method", "lora", "--rank",
               "2", "--max-steps", "6", "--epochs", "2", "--batch-size", "32", "--limit", "120",
               "--report-to", "tensorboard,mlflow,csv", "--out", str(out)])
    assert rc == 0, _err(capsys)
    results = json.loads((out / "results.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    steps = {s["step"]: s for s in metrics["steps"]}
    evals = [e for e in metrics["epochs"] if "loss" in e]
    assert len(steps) == 6 and evals
    final_step = results["train"]["steps"]

    rows = list(csv.DictReader((out / "tracking" / "metrics.csv").open()))
    from_csv: dict[str, dict[int, float]] = {}
    for row in rows:
        from_csv.setdefault(row["key"], {})[int(row["step"])] = float(row["value"])

    for name, logged in (("tensorboard", _tensorboard_scalars(out / "tracking")),
                         ("mlflow", _mlflow_scalars(out / "tracking" / "mlruns")),
                         ("csv", from_csv)):
        for key in ("loss", "lr", "grad_norm"):
            assert set(logged[f"train/{key}"]) == set(steps), (name, key)
            for step, value in logged[f"train/{key}"].items():
                assert _close(value, steps[step][key]), (name, key, step)
        for e in evals:  # each evaluation at its optimizer step
            for key in ("accuracy", "loss"):
                assert _close(logged[f"eval/{key}"][e["step"]], e[key]), (name, key, e["step"])
        assert _close(logged["eval/accuracy"][final_step], results["train"]["final"]["accuracy"])
        for key in ("accuracy", "loss"):  # the test split, as results.json reports it
            assert _close(logged[f"test/{key}"][final_step], results["test"][key]), (name, key)


def test_python_api_callback_logs_every_step(tmp_path):
    from deltatune.train.trackers import TrackerCallback

    cb = TrackerCallback(["csv"], tmp_path / "trk", config={"lr": 5e-3, "nested": {"a": 1}})
    cfg = TrainConfig(epochs=1, batch_size=32, lr=5e-3, progress=False)
    result = fit(W.build_model(), W.TRAIN, W.clean_collate, cfg, eval_data=W.EVAL,
                 callbacks=[cb], out_dir=tmp_path / "run", task="image-classification")
    assert cb.trackers == []  # closed when fit returned
    rows = list(csv.DictReader((tmp_path / "trk" / "metrics.csv").open()))
    losses = [float(r["value"]) for r in rows if r["key"] == "train/loss"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(losses) == result.steps == len(metrics["steps"])
    assert all(_close(a, s["loss"]) for a, s in zip(losses, metrics["steps"]))
    final = [float(r["value"]) for r in rows if r["key"] == "eval/accuracy"][-1]
    assert _close(final, result.final["accuracy"])


def test_unknown_tracker_and_missing_package_are_one_line_errors(tmp_path, capsys, monkeypatch):
    from deltatune.train import trackers

    with pytest.raises(TrainError, match="unknown tracker 'neptune'"):
        trackers.parse_trackers("tensorboard,neptune")
    out = tmp_path / "x"
    args = ["train", "--model", "small-cnn", "--data", "mnist", "--max-steps", "1", "--limit",
            "40", "--out", str(out)]
    assert main([*args, "--report-to", "neptune"]) == 2
    err = _err(capsys)
    assert "unknown tracker 'neptune'" in err and "\n" not in err and not out.exists()

    real = trackers.find_spec
    monkeypatch.setattr(trackers, "find_spec", lambda n: None if n == "wandb" else real(n))
    assert main([*args, "--report-to", "wandb"]) == 2
    err = _err(capsys)
    assert 'needs the wandb package' in err and 'deltatune[trackers]' in err and "\n" not in err
    assert not out.exists()
