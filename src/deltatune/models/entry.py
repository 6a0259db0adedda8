from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


class ModelError(ValueError):
    """Unknown model name, missing model package or directory, bad options."""


@dataclass
class ModelEntry:
    """A model with what it needs around it: how to batch examples, usual delta positions, new head."""

    name: str
    task: str  # "text-classification" | "image-classification" | "causal-lm"
    model: nn.Module  # forward(**batch) -> logits (B, C) or (B, T, V); batch["labels"] is ignored by it
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    default_targets: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)  # freshly initialised modules that must train
    source: str = ""
