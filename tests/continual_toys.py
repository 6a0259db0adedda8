"""Toy pieces the continual-learning tests share: a vector collate and a tanh feature map with a
linear head (``classes`` outputs)."""

from __future__ import annotations

import torch
from torch import nn


def vector_collate(examples):
    batch = {"x": torch.stack([e["x"] for e in examples])}
    if "label" in examples[0]:
        batch["labels"] = torch.tensor([e["label"] for e in examples])
    return batch


class ToyNet(nn.Module):
    """A random feature map (``body``, 8 → 16) and a linear head over ``classes``."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(8, 16), nn.Linear(16, classes)

    def forward(self, x, **_):
        return self.head(torch.tanh(self.body(x)))
