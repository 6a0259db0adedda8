"""Datasets as small in-memory lists of dict examples, and the seeded stratified split."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from torch.utils.data import Dataset as _TorchDataset

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad data input: unknown name, missing file, missing column, unknown split, empty data."""


@dataclass
class Dataset(_TorchDataset):
    """A labelled (or plain-text) dataset: ``examples[i]`` is a dict (``text``/``image``, ``label``, ...)."""

    name: str
    task: str  # "text-classification" | "image-classification" | "text"
    examples: list[dict[str, Any]]
    label_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]

    @property
    def labels(self) -> list[int]:
        return [ex["label"] for ex in self.examples]

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, task={self.task}, n={len(self)}, labels={self.label_names})"


def stratified_split(keys: Sequence[Any], seed: int, fractions=(0.8, 0.1, 0.1)) -> dict[str, list[int]]:
    """Indices of train/val/test with every stratum (label, or label+domain) split in the same
    proportions; depends only on ``keys`` order and ``seed``."""
    by_key: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        by_key.setdefault(k, []).append(i)
    rng = random.Random(seed)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for k in sorted(by_key, key=repr):
        idx = by_key[k][:]
        rng.shuffle(idx)
        n = len(idx)
        n_val = round(n * fractions[1])
        n_test = round(n * fractions[2])
        out["test"] += idx[:n_test]
        out["val"] += idx[n_test : n_test + n_val]
        out["train"] += idx[n_test + n_val :]
    for s in SPLITS:
        out[s].sort()
    return out


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def take(examples: list[dict], limit: int | None, seed: int) -> list[dict]:
    """At most ``limit`` examples, a seeded random subset that keeps the original order."""
    if limit is None or limit >= len(examples):
        return examples
    if limit < 1:
        raise DataError(f"limit must be positive, got {limit}")
    idx = sorted(random.Random(seed + 7).sample(range(len(examples)), limit))
    return [examples[i] for i in idx]
