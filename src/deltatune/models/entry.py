"""The model entry: a model plus what surrounds it (batching, usual delta positions, new head)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

TASKS = ("text-classification", "image-classification", "causal-lm")


class ModelError(ValueError):
    """Unknown model name, missing model package or directory, bad options."""


BUILT_IN_CODE = "built in code"  # ``source`` of a model initialised at random, with no checkpoint


@dataclass
class ModelEntry:
    """A model with what it needs around it.

    ``model(**collate(examples))`` returns logits ``(B, C)`` (classification) or ``(B, T, V)``
    (causal LM); the batch's ``labels`` are ignored by the forward and used by the trainer's loss.
    """

    name: str
    task: str  # one of TASKS
    model: nn.Module
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    default_targets: list[str] = field(
        default_factory=list
    )  # usual delta positions (name suffixes)
    head: list[str] = field(default_factory=list)  # freshly initialised modules that must train
    source: str = (
        ""  # where the weights came from: a package or directory name, never an absolute path
    )

    @property
    def from_scratch(self) -> bool:
        """True when the weights are a random initialisation (no pretrained checkpoint to rebuild
        them from)."""
        return self.source == BUILT_IN_CODE
