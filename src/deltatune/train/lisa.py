"""LISA: layer-wise importance sampling — only a few randomly chosen blocks train at a time.

Pan et al. 2024, https://arxiv.org/abs/2403.17919. The model's repeated blocks (the longest
``nn.ModuleList`` of same-type modules, e.g. a transformer's layers) are frozen except ``layers`` of
them, re-drawn every ``interval`` optimizer steps; everything outside the blocks (embeddings, norms,
the head) keeps training. Frozen parameters get no gradient, so AdamW keeps no state for a block
until it is first drawn, and backward computes no weight gradients for frozen blocks.

The draw is a function of (seed, step // interval), so a resumed run draws the same blocks.
Use it through ``TrainConfig(lisa_layers=2, lisa_interval=20)`` (or as a trainer callback).
Not for DDP: the set of parameters with gradients changes during training.
"""

from __future__ import annotations

import random

from torch import nn

from .config import TrainError


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest ModuleList whose items are all of one type (the model's repeated blocks)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 1
            and len({type(m) for m in module}) == 1
        ):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise TrainError(
            "LISA needs a model with repeated blocks (an nn.ModuleList of layers); this model has "
            "none"
        )
    return best


class LISA:
    """Trainer callback: keeps ``layers`` randomly drawn blocks trainable, re-drawn every
    ``interval`` steps."""

    def __init__(self, layers: int = 2, interval: int = 20, seed: int = 0) -> None:
        if layers < 1 or interval < 1:
            raise TrainError(f"LISA needs layers >= 1 and interval >= 1 (got {layers}, {interval})")
        self.layers, self.interval, self.seed = layers, interval, seed
        self.blocks: nn.ModuleList | None = None
        self.trainable: dict[int, list[tuple[nn.Parameter, bool]]] = {}
        self.active: list[int] = []

    def on_train_start(self, model: nn.Module) -> None:
        name, self.blocks = find_blocks(model)
        if self.layers > len(self.blocks):
            raise TrainError(
                f"lisa_layers={self.layers} but {name or 'the model'} has only {len(self.blocks)} "
                "blocks"
            )
        # only the parameters that were trainable to begin with take part (a frozen base stays
        # frozen)
        self.trainable = {
            i: [(p, p.requires_grad) for p in b.parameters()] for i, b in enumerate(self.blocks)
        }
        self._draw(0)

    def on_step_end(self, model: nn.Module, step: int) -> None:
        if step % self.interval == 0:
            self._draw(step)

    def on_train_end(self, model: nn.Module) -> None:
        """Give every block back the trainable flags it had before training."""
        for params in self.trainable.values():
            for p, was in params:
                p.requires_grad_(was)

    def _draw(self, step: int) -> None:
        rng = random.Random(self.seed * 1_000_003 + step // self.interval)
        self.active = sorted(rng.sample(range(len(self.blocks)), self.layers))
        for i, params in self.trainable.items():
            for p, was in params:
                p.requires_grad_(was and i in self.active)
                if i not in self.active:
                    p.grad = None
