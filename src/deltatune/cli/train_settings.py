"""The accelerator and tracker options every training job shares (train, continual, search).

Each job declares them with these factories, so the flags, their help and their panels read the
same everywhere, and turns them into :class:`~deltatune.train.TrainConfig` fields with
:func:`settings` and into a tracker with :func:`tracker`. Both check everything (device, precision,
compile, tracker names and packages) before a job creates ``--out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import typer

from .common import CLIError

ACCEL_PANEL = "Accelerator"
TRACK_PANEL = "Tracking"
TRACKING_DIR = "tracking"  # under --out


def precision_option() -> Any:
    return typer.Option(
        None, "--precision",
        help="fp32 | bf16 | fp16: autocast dtype of forward and loss (fp16: CUDA only, with "
        "loss scaling; default fp32)",
        rich_help_panel=ACCEL_PANEL,
    )


def compile_option() -> Any:
    return typer.Option(
        None, "--compile/--no-compile",
        help="torch.compile the training forward (slow first steps; default off)",
        rich_help_panel=ACCEL_PANEL,
    )


def device_option() -> Any:
    return typer.Option(
        None, "--device",
        help="auto | cpu | cuda | mps (default auto: a GPU when one is visible, else the CPU)",
        rich_help_panel=ACCEL_PANEL,
    )


def grad_accum_option() -> Any:
    return typer.Option(
        None, "--grad-accum",
        help="micro-batches per optimizer step (gradient accumulation; default 1)",
        rich_help_panel=ACCEL_PANEL,
    )


def checkpointing_option() -> Any:
    return typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing",
        help="recompute each transformer block's activations in backward: less memory, slower "
        "steps, the same gradients (default off)",
        rich_help_panel="Memory",
    )


def report_to_option() -> Any:
    return typer.Option(
        None, "--report-to",
        help="tensorboard | mlflow | wandb | csv, comma-separated: log the run under "
        f"OUT/{TRACKING_DIR}/ (wandb offline)",
        rich_help_panel=TRACK_PANEL,
    )


def settings(**values: Any) -> dict[str, Any]:
    """The given (non-None) accelerator options as TrainConfig fields, checked here: a device that
    is not visible, fp16 off CUDA or a compile torch cannot do is a one-line error now."""
    from ..train import TrainConfig, TrainError
    from ..train.accel import check_settings

    given = {k: v for k, v in values.items() if v is not None}
    try:
        check_settings(TrainConfig(**given))
    except TrainError as exc:
        raise CLIError(_as_flags(str(exc))) from None
    return given


def tracker(report_to: Optional[str], out: Path, config: Mapping[str, Any] | None = None,
            run_name: str = "deltatune"):
    """A :class:`~deltatune.train.trackers.TrackerCallback` writing under ``out/tracking`` (kept
    open across the job's ``fit`` calls: the job calls ``finish``), or None without
    ``--report-to``. Unknown names and missing packages fail here, before ``--out`` exists."""
    from ..train import TrainError
    from ..train.trackers import TrackerCallback, parse_trackers

    try:
        if not parse_trackers(report_to):
            return None
        return TrackerCallback(report_to, Path(out) / TRACKING_DIR, run_name=run_name,
                               config=config, keep_open=True)
    except TrainError as exc:
        raise CLIError(f"--report-to: {exc}") from None


def _as_flags(message: str) -> str:
    """TrainConfig's field names as the CLI's flags."""
    for field, flag in (("TrainConfig.precision", "--precision"),
                        ("TrainConfig.device", "--device"),
                        ("TrainConfig.compile=True", "--compile"),
                        ("TrainConfig.grad_accum", "--grad-accum")):
        message = message.replace(field, flag)
    return message.replace("device 'auto' or 'cpu'", "--device auto or cpu")


def check(config: Any) -> None:
    """:func:`deltatune.train.accel.check_settings` on a built TrainConfig, as a CLIError."""
    from ..train import TrainError
    from ..train.accel import check_settings

    try:
        check_settings(config)
    except TrainError as exc:
        raise CLIError(_as_flags(str(exc))) from None
