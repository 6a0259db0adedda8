"""Token cross-entropy from hidden states, a chunk of labelled positions at a time.

A causal LM's logits are (B, T, V) with V near 50k: 8 x 256 positions of SmolLM2 are 400 MB in
float32, and the usual loss keeps several such tensors (the logits, a shifted copy, the
log-softmax, their gradients). Here only the positions that predict a labelled token are projected
(labels -100 after the shift are skipped: prompts, padding), ``chunk_size`` of them at a time, and
in training each chunk's logits are recomputed in backward (``torch.utils.checkpoint``), so at most
one chunk of logits lives at any time. The results equal the whole-batch computation (the same
float32 log-softmax per position); only the summation order differs. The idea is Liger-Kernel's
fused linear cross-entropy (Hsu et al., https://arxiv.org/abs/2410.10989) without a fused kernel.

``project`` maps hidden states (N, H) to logits (N, V): a model's output head
(:meth:`deltatune.models.text.CausalLM.project`), or the identity when ``hidden`` are already
logits.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
#: labelled positions projected at once: 256 x 49152 float32 logits are 48 MiB, and the chunk's
#: softmax and its gradient as much again each. 1024 made one SmolLM2 step at batch 8 x 256 peak
#: 0.55 GB higher (2.45 vs 1.90 GB with checkpointing) for no measurable speed
#: (bench/bench_llm_step.py --chunk)
CHUNK_SIZE = 256

Project = Callable[[torch.Tensor], torch.Tensor]


class LossError(ValueError):
    """Hidden states and labels that do not fit together; the message names the shapes."""


def logits_of(out: Any) -> torch.Tensor:
    """A model's output reduced to its logits: a tensor, ``.logits``, ``["logits"]`` or the first
    element of a tuple."""
    if torch.is_tensor(out):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise LossError(
        f"the model returned {type(out).__name__}; it must return logits (a tensor or .logits)"
    )


def labelled(
    hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The states (N, H) of the positions whose next token is labelled, those tokens (N,) and the
    row of each (N,): position t predicts label t + 1."""
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise LossError(
            f"causal-lm needs logits (batch, time, vocab) and labels (batch, time); "
            f"got {tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX  # (B, T - 1)
    rows = keep.nonzero()[:, 0]
    return hidden[:, :-1][keep], target[keep], rows


def _chunk_logps(project: Project, states: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # float32 log-softmax whatever the model's dtype, as the whole-batch loss computes it
    return -F.cross_entropy(project(states).float(), target, reduction="none")


def token_logps(
    hidden: torch.Tensor, labels: torch.Tensor, project: Project, chunk_size: int = CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (N,) of the labelled tokens and their rows (N,), ``chunk_size`` positions
    at a time; with gradients on, each chunk's logits are recomputed in backward, not kept."""
    if chunk_size < 1:
        raise LossError(f"chunk_size must be a positive integer, got {chunk_size}")
    states, target, rows = labelled(hidden, labels)
    parts = []
    for start in range(0, target.numel(), chunk_size):
        piece = (project, states[start:start + chunk_size], target[start:start + chunk_size])
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logps, *piece, use_reentrant=False))
        else:
            parts.append(_chunk_logps(*piece))
    if not parts:
        return hidden.new_zeros(0, dtype=torch.float32), rows
    return torch.cat(parts), rows


def lm_loss(
    hidden: torch.Tensor, labels: torch.Tensor, project: Project, chunk_size: int = CHUNK_SIZE
) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (a zero that keeps the graph when
    there are none), as ``F.cross_entropy`` over the shifted whole-batch logits."""
    logps, _ = token_logps(hidden, labels, project, chunk_size)
    if logps.numel() == 0:
        return hidden.sum() * 0.0
    return -logps.sum() / logps.numel()


def sequence_logps(
    hidden: torch.Tensor, labels: torch.Tensor, project: Project, chunk_size: int = CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens (B,) and how many there are (B,)
    (DPO's sequence log-likelihoods)."""
    logps, rows = token_logps(hidden, labels, project, chunk_size)
    b = hidden.shape[0]
    sums = torch.zeros(b, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
    counts = torch.bincount(rows, minlength=b)
    return sums, counts


@torch.no_grad()
def eval_sums(
    hidden: torch.Tensor, labels: torch.Tensor, project: Project, chunk_size: int = CHUNK_SIZE
) -> torch.Tensor:
    """float64 [loss sum, correct (argmax = label), counted tokens] of one batch, chunked."""
    states, target, _ = labelled(hidden, labels)
    sums = torch.zeros(3, dtype=torch.float64, device=hidden.device)
    for start in range(0, target.numel(), chunk_size):
        logits = project(states[start:start + chunk_size]).float()
        part = target[start:start + chunk_size]
        sums[0] += F.cross_entropy(logits, part, reduction="sum").double()
        sums[1] += (logits.argmax(-1) == part).sum().double()
    sums[2] = target.numel()
    return sums
