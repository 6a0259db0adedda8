"""Training options (validated on creation), the task kinds the trainer knows, and its errors."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

SCHEDULES = ("linear", "cosine", "constant")

# Options that change the optimisation trajectory: a resumed run must use the values it started
# with, otherwise "resume" would silently train a different model than the interrupted run.
TRAJECTORY_FIELDS = (
    "epochs",
    "max_steps",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_ratio",
    "schedule",
    "grad_accum",
    "max_grad_norm",
    "seed",
    "metric",
    "lisa_layers",
    "lisa_interval",
    "norm_stats",
    "objective",
    "dpo_beta",
    "dpo_loss",
    "rpo_alpha",
)
NORM_STATS = ("auto", "update", "freeze")
OBJECTIVES = ("auto", "sft", "dpo")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")


class TrainError(ValueError):
    """Bad input to the trainer (config, data, model outputs); the message names the fix."""


class CheckpointError(TrainError):
    """A checkpoint that cannot be resumed from (missing, truncated, corrupt or incompatible)."""


@dataclass
class TrainConfig:
    """How to train; every field is checked in ``__post_init__`` with a message naming it."""

    epochs: int = 3
    max_steps: int | None = None  # optimizer steps in total; overrides epochs when set
    batch_size: int = 16  # examples per process and micro-batch
    eval_batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.0  # AdamW decoupled decay; never applied to biases and norm weights
    warmup_ratio: float = 0.06  # fraction of the optimizer steps with a linear warmup
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None = no clipping
    seed: int = 0
    save_every: int | None = None  # optimizer steps between resumable checkpoints
    eval_each_epoch: bool = True
    keep_best: bool = True  # restore the best evaluated trainable tensors at the end
    metric: str = "accuracy"  # model selection; loss/perplexity are minimised, LMs use loss
    progress: bool = True  # rich progress bar with loss and samples/s (main process only)
    lisa_layers: int | None = (
        None  # LISA: train only this many randomly drawn blocks at a time (see train/lisa.py)
    )
    lisa_interval: int = 20  # LISA: optimizer steps between draws
    # BatchNorm running statistics while training: "auto" keeps those of norm layers with no
    # trainable parameter fixed (a frozen layer stays frozen, buffers included, so a saved delta
    # reproduces the trained model); "update" always updates them (PyTorch's train mode),
    # "freeze" never does.
    norm_stats: Literal["auto", "update", "freeze"] = "auto"
    # classification loss weights: None (plain mean cross-entropy), "balanced" (class c weighs
    # N / (C * n_c), from the training labels: every class counts as much in total) or one weight
    # per class
    class_weights: str | list[float] | None = None
    # causal LMs: "sft" (cross-entropy of the labelled tokens) or "dpo" (preference pairs: chosen
    # rows over rejected rows); "auto" is sft for a causal LM and cross-entropy for a classifier
    objective: Literal["auto", "sft", "dpo"] = "auto"
    dpo_beta: float = 0.1  # DPO's β: how far the policy may move from the reference
    dpo_loss: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge, as trl's DPOConfig.loss_type
    # DPO: weight of the chosen answers' NLL added to the loss (RPO; trl's "sft" loss type); 0 =
    # plain DPO. It keeps DPO from lowering the chosen answer's likelihood (docs/language-models.md)
    rpo_alpha: float = 0.0
    # recompute each block's activations in backward instead of keeping them (train/memory.py):
    # less memory, about one more forward of compute; the same gradients
    gradient_checkpointing: bool = False
    # accelerator settings (train/accel.py): the autocast dtype of forward and loss ("fp32" = no
    # autocast; "fp16" scales the loss and needs CUDA), torch.compile of the training forward, the
    # device ("auto": a GPU when one is visible, else the CPU), and FSDP sharding of parameters,
    # gradients and optimizer state across the processes of an ``accelerate launch`` (no effect on
    # one process). None of them changes what is trained, only how.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    fsdp: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                self._bad(name, "must be a positive integer")
        for name in ("max_steps", "save_every", "lisa_layers"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                self._bad(name, "must be a positive integer or None")
        if not _is_int(self.lisa_interval) or self.lisa_interval < 1:
            self._bad("lisa_interval", "must be a positive integer")
        if not _is_int(self.seed):
            self._bad("seed", "must be an integer")
        if not _is_real(self.lr) or not self.lr > 0:
            self._bad("lr", "must be a finite number > 0 (e.g. 5e-4)")
        if not _is_real(self.weight_decay) or self.weight_decay < 0:
            self._bad("weight_decay", "must be a finite number >= 0")
        if not _is_real(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            self._bad("warmup_ratio", "must be in [0, 1)")
        if self.schedule not in SCHEDULES:
            self._bad("schedule", f"must be one of {', '.join(SCHEDULES)}")
        if self.max_grad_norm is not None and (
            not _is_real(self.max_grad_norm) or self.max_grad_norm <= 0
        ):
            self._bad("max_grad_norm", "must be a number > 0, or None to disable clipping")
        if self.norm_stats not in NORM_STATS:
            self._bad("norm_stats", f"must be one of {', '.join(NORM_STATS)}")
        cw = self.class_weights
        if isinstance(cw, tuple):
            self.class_weights = cw = list(cw)
        if not (
            cw is None
            or cw == "balanced"
            or (
                isinstance(cw, list)
                and cw
                and all(_is_real(w) and w >= 0 for w in cw)
                and any(w > 0 for w in cw)
            )
        ):
            self._bad(
                "class_weights",
                "must be None, 'balanced' or a list of one weight >= 0 per class (not all 0)",
            )
        if self.objective not in OBJECTIVES:
            self._bad("objective", f"must be one of {', '.join(OBJECTIVES)}")
        if not _is_real(self.dpo_beta) or not self.dpo_beta > 0:
            self._bad("dpo_beta", "must be a finite number > 0 (e.g. 0.1)")
        from ..lm.objectives import dpo_losses

        if self.dpo_loss not in dpo_losses():
            self._bad("dpo_loss", f"must be one of {', '.join(dpo_losses())}")
        if (isinstance(self.rpo_alpha, bool) or not _is_real(self.rpo_alpha)
                or not self.rpo_alpha >= 0):
            self._bad("rpo_alpha", "must be a finite number >= 0 (0 = plain DPO, e.g. 1.0)")
        if not isinstance(self.metric, str) or not self.metric:
            self._bad("metric", "must be a metric name such as accuracy or loss")
        if self.precision not in PRECISIONS:
            self._bad("precision", f"must be one of {', '.join(PRECISIONS)}")
        if self.device not in DEVICES:
            self._bad("device", f"must be one of {', '.join(DEVICES)}")
        if self.precision == "fp16" and self.device in ("cpu", "mps"):
            self._bad("precision", f"(fp16 with loss scaling) needs CUDA, not {self.device}; use "
                      "bf16 on the CPU")
        for name in ("eval_each_epoch", "keep_best", "progress", "gradient_checkpointing",
                     "compile", "fsdp"):
            if not isinstance(getattr(self, name), bool):
                self._bad(name, "must be true or false")

    def _bad(self, name: str, problem: str) -> None:
        raise TrainError(f"TrainConfig.{name}={getattr(self, name)!r} {problem}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def task_kind(task: str) -> Literal["classification", "causal-lm"]:
    """The loss family of a task name: ``causal-lm``, or any ``*classification`` task."""
    if task == "causal-lm":
        return "causal-lm"
    if isinstance(task, str) and task.endswith("classification"):
        return "classification"
    raise TrainError(
        f"task={task!r} is not supported; use text-classification, image-classification or "
        "causal-lm"
    )


def selection_metric(metric: str, kind: str) -> tuple[str, bool]:
    """The evaluation key used to pick the best state, and whether higher is better."""
    if kind == "causal-lm":
        if metric in ("loss", "perplexity"):
            return metric, False
        if metric == "accuracy":  # the default: language models are selected by loss instead
            return "loss", False
        raise TrainError(
            f"TrainConfig.metric={metric!r} is not computed for causal-lm; use loss or perplexity"
        )
    if metric == "accuracy":
        return metric, True
    if metric == "loss":
        return metric, False
    raise TrainError(
        f"TrainConfig.metric={metric!r} is not computed for classification; use accuracy or loss"
    )
