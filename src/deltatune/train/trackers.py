"""Experiment trackers (TensorBoard, MLflow, Weights & Biases offline, CSV) as a training callback.

    from deltatune.train import TrainConfig, fit
    from deltatune.train.trackers import TrackerCallback

    tracker = TrackerCallback("tensorboard,mlflow", "runs/x/tracking", config={"lr": 1e-3})
    fit(model, train, collate, TrainConfig(lr=1e-3), eval_data=val, callbacks=[tracker])

The callback receives the trainer's ``on_log`` numbers (``train/loss``, ``train/lr``,
``train/grad_norm`` each optimizer step, ``eval/accuracy``, ``eval/loss`` ... each evaluation) and
hands them to accelerate's tracker classes (``accelerate.tracking``), which own the file formats;
deltatune adds only a CSV tracker (one ``step,key,value`` row per number, readable without any
package). Every tracker writes under ``logging_dir``: TensorBoard's event files in
``logging_dir/RUN_NAME``, MLflow's file store in ``logging_dir/mlruns`` (unless
``MLFLOW_TRACKING_URI`` names another), wandb's offline run in ``logging_dir/wandb`` (nothing is
sent; ``wandb sync`` uploads it later), ``logging_dir/metrics.csv``. Only the main process logs.

Names are checked, and the packages looked up, when the callback is made: an unknown tracker or a
missing package is one :class:`TrainError` naming the extra to install, before any training.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from .callbacks import BaseCallback
from .config import TrainError

TRACKERS = ("tensorboard", "mlflow", "wandb", "csv")
_EXTRA = 'pip install "deltatune[trackers]"'


def parse_trackers(report_to: str | Sequence[str] | None) -> list[str]:
    """``"tensorboard,csv"`` or ``["mlflow"]`` → checked tracker names (``none``/empty: ``[]``).

    Raises :class:`TrainError` for an unknown name or a tracker whose package is not installed."""
    if report_to is None:
        return []
    items = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if not name or name == "none":
            continue
        if name not in TRACKERS:
            raise TrainError(f"unknown tracker {name!r}; use one of {', '.join(TRACKERS)} "
                             "(comma-separated for several)")
        if name not in names:
            names.append(name)
    for name in names:
        missing = _missing_package(name)
        if missing:
            raise TrainError(f"the {name} tracker needs the {missing} package, which is not "
                             f"installed: {_EXTRA}")
    return names


def _missing_package(name: str) -> str | None:
    if name == "tensorboard":
        # accelerate's TensorBoardTracker writes through torch.utils.tensorboard or tensorboardX
        return None if (find_spec("tensorboard") or find_spec("tensorboardX")) else "tensorboard"
    if name in ("mlflow", "wandb"):
        return None if find_spec(name) else name
    return None


def _csv_tracker_class():
    from accelerate.tracking import GeneralTracker, on_main_process

    class CSVTracker(GeneralTracker):
        """``metrics.csv`` in long form (step, key, value): any set of keys, one file."""

        name = "csv"
        requires_logging_directory = True
        main_process_only = True

        def __init__(self, run_name: str, logging_dir: str | os.PathLike) -> None:
            super().__init__()
            self.run_name = run_name
            self.path = Path(logging_dir) / "metrics.csv"
            self.file = None

        @on_main_process
        def start(self) -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            self.file = open(self.path, "a", newline="")  # noqa: SIM115 - closed in finish()
            self.writer = csv.writer(self.file)
            if fresh:
                self.writer.writerow(["step", "key", "value"])

        @property
        def tracker(self):
            return self.file

        @on_main_process
        def store_init_configuration(self, values: dict) -> None:
            return None

        @on_main_process
        def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.writerow(["" if step is None else step, key, repr(float(value))])
            self.file.flush()

        @on_main_process
        def finish(self) -> None:
            if self.file is not None:
                self.file.close()
                self.file = None

    return CSVTracker


def make_tracker(name: str, logging_dir: str | Path, run_name: str = "deltatune") -> Any:
    """An ``accelerate.tracking`` tracker (started) writing under ``logging_dir``."""
    logging_dir = Path(logging_dir)
    if name == "tensorboard":
        from accelerate.tracking import TensorBoardTracker

        tracker = TensorBoardTracker(run_name, str(logging_dir))
    elif name == "mlflow":
        import mlflow
        from accelerate.tracking import MLflowTracker

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow's file store (plain files, readable by `mlflow ui --backend-store-uri`):
            # MLflow 3 asks for an opt-in, and its SQLite store takes ~20 s to create its tables
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            (logging_dir / "mlruns").mkdir(parents=True, exist_ok=True)
            mlflow.set_tracking_uri((logging_dir / "mlruns").resolve().as_uri())
        tracker = MLflowTracker(experiment_name=run_name, run_name=run_name)
    elif name == "wandb":
        from accelerate.tracking import WandBTracker

        logging_dir.mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE", "offline")  # never online unless asked for
        tracker = WandBTracker(run_name, dir=str(logging_dir), mode=mode)
    elif name == "csv":
        tracker = _csv_tracker_class()(run_name, logging_dir)
    else:
        raise TrainError(f"unknown tracker {name!r}; use one of {', '.join(TRACKERS)}")
    tracker.start()
    return tracker


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings → ``{"a/b": scalar}`` (trackers take flat hyperparameters)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)) or value is None:
            out[name] = value if value is not None else "None"
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(map(str, value))
    return out


class TrackerCallback(BaseCallback):
    """Log training to experiment trackers; see the module docstring.

    ``report_to``: tracker names (``"tensorboard,csv"`` or a list). ``config``: settings recorded
    once as the run's hyperparameters. ``keep_open=True`` keeps the trackers open after ``fit``
    returns (several ``fit`` calls in one run, or numbers logged afterwards with :meth:`log`);
    then call :meth:`finish` (or use the callback as a context manager)."""

    def __init__(self, report_to: str | Sequence[str], logging_dir: str | Path, *,
                 run_name: str = "deltatune", config: Mapping[str, Any] | None = None,
                 keep_open: bool = False) -> None:
        self.names = parse_trackers(report_to)
        if not self.names:
            raise TrainError("TrackerCallback needs at least one tracker name, e.g. 'tensorboard'")
        self.logging_dir = Path(logging_dir)
        self.run_name, self.config, self.keep_open = run_name, dict(config or {}), keep_open
        self.trackers: list[Any] = []

    def start(self) -> None:
        """Open the trackers (done on the first log, or when training starts)."""
        if self.trackers:
            return
        self.trackers = [make_tracker(n, self.logging_dir, self.run_name) for n in self.names]
        if self.config:
            hparams = _flat(self.config)
            for tracker in self.trackers:
                if tracker.name != "tensorboard":  # its hparams go to a new timestamped folder
                    tracker.store_init_configuration(hparams)

    def log(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric ``values`` (non-numbers are skipped) at ``step``."""
        numbers = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not numbers:
            return
        self.start()
        for tracker in self.trackers:
            tracker.log(numbers, step=step)

    def finish(self) -> None:
        """Flush and close every tracker."""
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []

    def __enter__(self) -> TrackerCallback:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()

    # -- training hooks ---------------------------------------------------------------------------
    def on_train_start(self, model: Any) -> None:
        self.start()

    def on_log(self, values: dict[str, float], step: int) -> None:
        self.log(values, step)

    def on_train_end(self, model: Any) -> None:
        if not self.keep_open:
            self.finish()
