"""Batches in, logits out, losses and evaluation sums; shared by ``fit`` and ``evaluate``."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainError, task_kind
from .memory import release_memory

IGNORE_INDEX = -100


def to_device(batch: Any, device: torch.device) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        raise TrainError(
            f"collate must return a dict of tensors (with 'labels'), got {type(batch).__name__}"
        )
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def labels_of(batch: Mapping[str, Any], kind: str) -> torch.Tensor:
    if "labels" in batch:
        return batch["labels"]
    if kind == "causal-lm" and "input_ids" in batch:  # plain LM data: predict the input itself
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        return labels
    raise TrainError(f"the batch has no 'labels' (keys: {sorted(batch)}); make collate return them")


def forward(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """``model(**inputs)`` without the labels, reduced to its logits tensor."""
    from ..lm.loss import LossError, logits_of

    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    try:
        return logits_of(out)
    except LossError as exc:
        raise TrainError(str(exc)) from None


def _flat(
    logits: torch.Tensor, labels: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) logits and (N,) targets; for LMs the logits at t predict the token at t + 1."""
    if kind == "causal-lm":
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise TrainError(
                f"causal-lm needs logits (batch, time, vocab) and labels (batch, time); "
                f"got {tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        return logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise TrainError(f"classification needs logits (batch, classes) and labels (batch,); "
                         f"got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return logits, labels


def compute_loss(logits: torch.Tensor, labels: torch.Tensor, task: str,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy (shifted next-token CE for ``causal-lm``), ignoring label -100.

    ``weight`` (one per class, classification only) gives the weighted mean, as in
    ``F.cross_entropy``.
    """
    flat, target = _flat(logits, labels, task_kind(task))
    if not bool((target != IGNORE_INDEX).any()):
        return flat.sum() * 0.0  # nothing to predict here: a zero loss that still has a graph
    if weight is not None and weight.numel() != flat.shape[-1]:
        raise TrainError(
            f"TrainConfig.class_weights has {weight.numel()} weights but the model predicts "
            f"{flat.shape[-1]} classes; give one weight per class"
        )
    if weight is None:
        return F.cross_entropy(flat.float(), target, ignore_index=IGNORE_INDEX)
    # the weighted mean of F.cross_entropy(weight=...), but 0 rather than NaN for a batch of
    # zero-weight classes
    per = F.cross_entropy(flat.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    w = weight.to(per)[target.clamp_min(0)] * (target != IGNORE_INDEX)
    return (per * w).sum() / w.sum().clamp_min(torch.finfo(per.dtype).tiny)


def class_weights(
    spec: str | list[float] | None, labels: list[int], n_classes: int | None
) -> torch.Tensor | None:
    """The per-class loss weights of ``TrainConfig.class_weights`` for training labels ``labels``.

    ``"balanced"``: class c weighs N / (C * n_c), so every class present adds up to the same total
    weight (scikit-learn's ``class_weight="balanced"``); a class absent from the labels gets
    weight 1.
    """
    if spec is None:
        return None
    if spec != "balanced":
        if n_classes and len(spec) != n_classes:
            raise TrainError(
                f"TrainConfig.class_weights has {len(spec)} weights but the data has {n_classes} "
                "classes; give one weight per class"
            )
        return torch.tensor([float(w) for w in spec])
    if not labels:
        raise TrainError(
            "TrainConfig.class_weights='balanced' needs labelled training examples "
            "(a 'label' field)"
        )
    c = max(n_classes or 0, max(labels) + 1)
    counts = torch.bincount(torch.tensor(labels), minlength=c).double()
    present = int((counts > 0).sum())
    weights = torch.where(
        counts > 0, len(labels) / (present * counts.clamp_min(1)), torch.ones_like(counts)
    )
    return weights.float()


def eval_sums(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """float64 [loss sum, correct, counted targets] for one batch (summed across batches/ranks)."""
    flat, target = _flat(logits, labels, kind)
    keep = target != IGNORE_INDEX
    loss = F.cross_entropy(flat.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((flat.argmax(-1) == target) & keep).sum()
    return torch.stack([loss.double(), correct.double(), keep.sum().double()])


def metrics_from_sums(sums: torch.Tensor, kind: str) -> dict[str, float]:
    loss_sum, correct, count = (float(v) for v in sums.cpu())
    loss = loss_sum / count if count else float("nan")
    if kind == "causal-lm":
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count)}
    return {"accuracy": correct / count if count else float("nan"), "loss": loss, "n": int(count)}


def objective_of(cfg: Any, kind: str, reference: Callable | None = None) -> Any:
    """The causal-LM :class:`~deltatune.lm.objectives.Objective` of a TrainConfig (``auto``:
    sft); None for classification (cross-entropy on the logits)."""
    if kind != "causal-lm":
        return None
    from ..lm.objectives import make_objective

    name = "sft" if cfg.objective == "auto" else cfg.objective
    return make_objective(name, beta=cfg.dpo_beta, loss_type=cfg.dpo_loss, reference=reference,
                          rpo_alpha=getattr(cfg, "rpo_alpha", 0.0))


@torch.no_grad()
def evaluate_shard(
    model: nn.Module,
    data,
    collate: Callable,
    kind: str,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    objective: Any = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Evaluate examples ``rank::world`` of ``data`` and sum the results over ranks with ``reduce``.

    A causal LM is scored by ``objective`` (:mod:`deltatune.lm.objectives`; chunked, no
    whole-batch logits); ``progress(n)`` is told of each batch of ``n`` examples done. Freed heap
    blocks (a training step's activations) go back to the system first (:func:`release_memory`)."""
    from ..lm.loss import LossError
    from ..lm.objectives import ObjectiveError

    release_memory()
    was_training = model.training
    model.eval()
    sums = None
    indices = list(range(rank, len(data), world))
    try:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            batch = to_device(collate([data[i] for i in chunk]), device)
            if objective is None:
                outputs = forward(model, batch)
                part = None
            else:
                batch = {**batch, "labels": labels_of(batch, kind)}
                try:
                    outputs = part = objective.sums(model, batch)
                except (LossError, ObjectiveError) as exc:
                    raise TrainError(str(exc)) from None
            if not bool(torch.isfinite(outputs).all()):  # a broken model must not report numbers
                raise TrainError(
                    f"the model's outputs hold NaN or inf values (examples {chunk[0]}-"
                    f"{chunk[-1]}); its weights or the adapter are broken, or the inputs overflow "
                    "its dtype"
                )
            if part is None:
                part = eval_sums(outputs, labels_of(batch, kind), kind)
            sums = part if sums is None else sums + part
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    if sums is None:  # this process's shard is empty
        sums = torch.zeros(3, dtype=torch.float64, device=device)
    if reduce is not None:
        sums = reduce(sums)
    return objective.metrics(sums) if objective is not None else metrics_from_sums(sums, kind)


def evaluate(model: nn.Module, data, collate: Callable, *, task: str, batch_size: int = 64,
             device: torch.device | str | None = None, objective: Any = None,
             progress: bool = False) -> dict[str, float]:
    """Evaluate ``model`` on ``data`` (examples → ``collate`` → ``model(**batch)``).

    Classification: ``accuracy``, mean ``loss`` and ``n``; causal-lm: token-mean ``loss``,
    ``perplexity`` = exp(loss), ``token_accuracy`` and ``tokens`` (labels -100 are not counted),
    computed in chunks without the whole batch's logits. ``objective`` (causal-lm): a TrainConfig
    or an :class:`~deltatune.lm.objectives.Objective` (``dpo``: the mean DPO ``loss``, rewards
    and ``reward_accuracy`` over ``pairs``); default sft. ``progress``: a progress bar. The
    model's train/eval mode is restored afterwards.
    """
    kind = task_kind(task)
    if len(data) == 0:
        raise TrainError("evaluate() got an empty dataset; check the split and the limit")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise TrainError(f"batch_size={batch_size!r} must be a positive integer")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    if objective is None or hasattr(objective, "objective"):  # None or a TrainConfig
        from .config import TrainConfig

        objective = objective_of(objective or TrainConfig(), kind)
    from .report import ProgressBar

    bar = ProgressBar(progress, len(data), 0, label="eval")
    try:
        return evaluate_shard(model, data, collate, kind, batch_size, torch.device(device),
                              objective=objective, progress=bar.advance)
    finally:
        bar.close()
