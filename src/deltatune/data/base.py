"""Datasets as small in-memory lists of dict examples, and the seeded stratified split."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence, TypeVar

from torch.utils.data import Dataset as _TorchDataset

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad data input: unknown name, missing file, missing column, unknown split, empty data."""


@dataclass
class Dataset(_TorchDataset):
    """A labelled (or plain-text) dataset: ``examples[i]`` is a dict (``text``/``image``, ``label``,
    ...)."""

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
        return [ex["label"] for ex in self.examples if "label" in ex]

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, task={self.task}, n={len(self)}, labels={self.label_names})"


#: train/val/test fractions of the splits deltatune draws itself
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def check_fractions(fractions: Sequence[float] | None) -> tuple[float, float, float]:
    """``fractions`` as a (train, val, test) tuple, or :data:`DEFAULT_FRACTIONS` for ``None``."""
    if fractions is None:
        return DEFAULT_FRACTIONS
    try:
        out = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise DataError(
            f"split fractions must be three numbers (train, val, test), got {fractions!r}"
        ) from None
    if len(out) != 3 or any(not 0 < f < 1 for f in out) or abs(sum(out) - 1) > 1e-6:
        raise DataError(
            f"split fractions must be three numbers in (0, 1) summing to 1 (train, val, test), "
            f"e.g. 0.7,0.1,0.2; got {fractions!r}"
        )
    return out  # type: ignore[return-value]


def stratified_split(
    keys: Sequence[Any],
    seed: int,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    groups: Sequence[Any] | None = None,
) -> dict[str, list[int]]:
    """Indices of train/val/test with every stratum (``keys``: label, or domain+label) split in the
    same proportions; depends only on the order of ``keys`` and on ``seed``.

    Items sharing a group (e.g. the same text: the BBC corpus repeats 98 articles, the tweets 915
    retweets) all land in the split of the group's first item, so no duplicate leaks from train
    into test.
    """
    first: dict[Any, int] = {}
    owner = (
        [first.setdefault(g, i) for i, g in enumerate(groups)]
        if groups is not None
        else list(range(len(keys)))
    )
    by_key: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        if owner[i] == i:
            by_key.setdefault(k, []).append(i)
    rng = random.Random(seed)
    where: dict[int, str] = {}
    for k in sorted(by_key, key=repr):
        idx = by_key[k][:]
        rng.shuffle(idx)
        n_val, n_test = round(len(idx) * fractions[1]), round(len(idx) * fractions[2])
        where.update({i: "test" for i in idx[:n_test]})
        where.update({i: "val" for i in idx[n_test : n_test + n_val]})
        where.update({i: "train" for i in idx[n_test + n_val :]})
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i in range(len(keys)):
        out[where[owner[i]]].append(i)
    return out


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


T = TypeVar("T")


def take(examples: list[T], limit: int | None, seed: int) -> list[T]:
    """At most ``limit`` items, a seeded random subset that keeps the original order."""
    if limit is None or limit >= len(examples):
        return examples
    if limit < 1:
        raise DataError(f"limit must be positive, got {limit}")
    idx = sorted(random.Random(seed + 7).sample(range(len(examples)), limit))
    return [examples[i] for i in idx]


def require_classes(where: str, split: str, labels: Sequence[int], names: Sequence[str]) -> None:
    """Refuse a training split with fewer than two classes: a one-class classifier reaches accuracy
    1.0 while learning nothing. Evaluation splits may hold one class (e.g. a file of one domain)."""
    if split != "train":
        return
    present = sorted(set(labels))
    if len(present) < 2:
        found = (
            ", ".join(repr(names[i]) if 0 <= i < len(names) else repr(i) for i in present) or "none"
        )
        raise DataError(
            f"{where}: the training data holds {len(present)} class ({found}); a classifier needs "
            "at least 2 classes, so add examples of the others"
        )
