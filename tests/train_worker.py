"""Helper processes for tests/test_train.py (not collected by pytest).

    # a run the test SIGKILLs (resumes if OUT has a checkpoint):
    python tests/train_worker.py kill OUT DELAY
    # 2-process DDP (gloo on CPU):
    accelerate launch --multi_gpu --num_processes 2 tests/train_worker.py ddp OUT

The model, data and config are defined here once and imported by the test for its reference runs.
The collate draws from numpy's and python's RNGs and the model has dropout and BatchNorm, so an
exact resume needs every random state and the running statistics restored, not only the weights.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deltatune.train import BaseCallback, TrainConfig, fit

D, CLASSES = 8, 3


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(D, 16)  # frozen below, like a pretrained base
        self.norm = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.2)
        self.hidden = nn.Linear(16, 16)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.norm(self.embed(x))))
        return self.head(self.drop(torch.relu(self.hidden(h))))


def build_model(seed: int = 0) -> DropoutNet:
    torch.manual_seed(seed)
    model = DropoutNet()
    model.embed.requires_grad_(False)
    return model


def make_data(n: int, seed: int) -> list[dict]:
    """Three Gaussian clusters in 8-D: learnable, not trivially so (some overlap)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLASSES, D, generator=torch.Generator().manual_seed(123)) * 1.2
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    x = centers[labels] + torch.randn(n, D, generator=g)
    return [{"x": x[i], "label": int(labels[i])} for i in range(n)]


def clean_collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "x": torch.stack([e["x"] for e in examples]),
        "labels": torch.tensor([e["label"] for e in examples]),
    }


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Augmenting collate: numpy noise, and python's RNG drops a feature now and then."""
    batch = clean_collate(examples)
    batch["x"] += torch.from_numpy(
        np.random.normal(0.0, 0.05, size=tuple(batch["x"].shape))
    ).float()
    if random.random() < 0.5:
        batch["x"][:, random.randrange(D)] = 0.0
    return batch


TRAIN, EVAL = make_data(130, seed=1), make_data(60, seed=2)
# 130 examples in micro-batches of 10, two per step: 7 steps per epoch, the last one short.
CONFIG = TrainConfig(
    epochs=5,
    batch_size=10,
    grad_accum=2,
    lr=5e-3,
    schedule="cosine",
    warmup_ratio=0.1,
    weight_decay=0.01,
    max_grad_norm=0.5,
    save_every=2,
    seed=7,
    progress=False,
)


class Slow(BaseCallback):
    """Stretches the run so that the test can kill it at a random moment."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def on_step_end(self, model: nn.Module, step: int) -> None:
        time.sleep(self.delay)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    mode, out = argv[0], Path(argv[1])
    if (
        mode == "kill"
    ):  # resumes when a checkpoint is there, so it can be killed and restarted repeatedly
        from safetensors.torch import save_file

        model = build_model()
        fit(
            model,
            TRAIN,
            collate,
            CONFIG,
            eval_data=EVAL,
            out_dir=out,
            resume=True,
            callbacks=[Slow(float(argv[2]))],
        )
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(out / "final.safetensors"),
        )
    elif mode == "ddp":
        from accelerate import PartialState
        from safetensors.torch import save_file

        model = build_model()
        cfg = TrainConfig(epochs=3, batch_size=6, lr=1e-2, save_every=5, seed=3, progress=False)
        fit(model, TRAIN, collate, cfg, eval_data=EVAL, out_dir=out)
        rank = PartialState().process_index
        # Test output only (the trainer itself writes from rank 0 alone).
        tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()}
        tensors.update({n: b.detach().contiguous() for n, b in model.named_buffers()})
        save_file(tensors, str(out / f"weights_rank{rank}.safetensors"))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
