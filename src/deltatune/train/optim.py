"""What is optimised and how fast: trainable tensors, AdamW groups, the warmup + decay schedule,
and the seeded data order (a pure function of seed and epoch, so a resumed run sees the same
batches)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import TrainConfig, TrainError


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise TrainError(
            "the model has no trainable parameters; attach a delta (dt.attach) or set requires_grad"
        )
    return named


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The BatchNorm-style layers that track running statistics, by name."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def norm_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """BatchNorm running statistics: not parameters, yet training changes them, so they are saved
    with the trainable tensors (a resumed or best-restored model must have the same statistics)."""
    out = []
    for mod_name, mod in norm_layers(model):
        for buf_name, buf in mod.named_buffers(recurse=False):
            if buf is not None:
                out.append((f"{mod_name}.{buf_name}" if mod_name else buf_name, buf))
    return out


def _decays(name: str, param: nn.Parameter) -> bool:
    # Decay shrinks weights towards zero; for biases, norm gains and scaling vectors (1-D) that
    # means towards a different function, not towards a simpler one, so they are left out.
    lowered = name.lower()
    return param.dim() >= 2 and not lowered.endswith("bias") and "norm" not in lowered


def build_optimizer(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; group 0 decays, group 1 does not (empty groups
    dropped)."""
    decay = [p for n, p in named if _decays(n, p)]
    rest = [p for n, p in named if not _decays(n, p)]
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        )
        if g["params"]
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based) of ``total``.

    Linear warmup reaching 1 at step ``warmup - 1`` (no wasted zero-lr step), then linear decay,
    cosine decay (https://arxiv.org/abs/1608.03983, without restarts) or constant.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Plan:
    """How an epoch is cut: micro-batches of ``batch_size`` per process, ``grad_accum`` per step."""

    n: int
    batch_size: int
    world: int
    grad_accum: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    @property
    def micro_per_epoch(self) -> int:
        return math.ceil(self.n / self.global_batch)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_per_epoch / self.grad_accum)

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        """The epoch's permutation, from its own generator: independent of the global RNG."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen)

    def micro_batch(self, order: torch.Tensor, micro: int, rank: int) -> tuple[list[int], int]:
        """Indices of micro-batch ``micro`` for process ``rank``, and the global number of new
        examples.

        A short last batch is padded from the epoch's start so that every process gets the same
        number of examples (as torch's DistributedSampler does); one process never pads.
        """
        chunk = order[micro * self.global_batch:(micro + 1) * self.global_batch]
        fresh = len(chunk)
        pad = (-fresh) % self.world
        if pad:
            chunk = torch.cat([chunk, order[:pad]])
        share = len(chunk) // self.world
        return chunk[rank * share:(rank + 1) * share].tolist(), fresh
