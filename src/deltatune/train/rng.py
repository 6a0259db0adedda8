"""Every random state a training step can touch, captured per process without pickle.

torch's generator states are byte tensors (safetensors); python's and numpy's Mersenne-Twister
states are plain integers (JSON). Under DDP each process has its own states, so they travel to the
main process as tensors (one collective per field) and are written there for all ranks.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np
import torch

_NAN = float("nan")


def capture(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's states, each as a 1-D tensor (so they can be gathered across processes)."""
    version, words, gauss = random.getstate()  # (3, 625 ints, float | None)
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # ('MT19937', 624 uint32, ...)
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python_words": torch.tensor(list(words), dtype=torch.int64),
        "python_extra": torch.tensor(
            [version, _NAN if gauss is None else gauss], dtype=torch.float64
        ),
        "numpy_words": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_extra": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def gather(state: dict[str, torch.Tensor], world: int, device: torch.device,
           all_gather: Callable[[torch.Tensor], torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The states of all ``world`` processes (rank order); identity for one process."""
    if world == 1:
        return [state]
    # Collectives run on the training device (NCCL cannot move CPU tensors); results come back to
    # CPU.
    joined = {k: all_gather(v.to(device)).cpu() for k, v in state.items()}
    return [{k: v.view(world, -1)[r].clone() for k, v in joined.items()} for r in range(world)]


def to_files(
    states: list[dict[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split per-rank states into safetensors tensors (torch) and JSON (python, numpy)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for rank, s in enumerate(states):
        tensors[f"rank{rank}/torch_cpu"] = s["torch_cpu"]
        if "cuda" in s:
            tensors[f"rank{rank}/cuda"] = s["cuda"]
        version, gauss = s["python_extra"].tolist()
        pos, has_gauss, cached = s["numpy_extra"].tolist()
        meta[f"rank{rank}"] = {
            "python": {
                "version": int(version),
                "words": s["python_words"].tolist(),
                "gauss": None if gauss != gauss else gauss,
            },
            "numpy": {
                "keys": s["numpy_words"].tolist(),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": cached,
            },
        }
    return tensors, meta


def restore(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], rank: int, device: torch.device
) -> None:
    """Set this process's states from what :func:`to_files` wrote (KeyError/ValueError if
    malformed)."""
    mine = meta[f"rank{rank}"]
    torch.set_rng_state(tensors[f"rank{rank}/torch_cpu"].to(torch.uint8))
    if device.type == "cuda" and f"rank{rank}/cuda" in tensors:
        torch.cuda.set_rng_state(tensors[f"rank{rank}/cuda"].to(torch.uint8), device)
    py = mine["python"]
    random.setstate((py["version"], tuple(int(w) for w in py["words"]), py["gauss"]))
    npy = mine["numpy"]
    np.random.set_state(("MT19937", np.asarray(npy["keys"], dtype=np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
