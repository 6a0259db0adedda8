"""Datasets written with ``datasets.save_to_disk`` (a Dataset or a DatasetDict directory)."""

from __future__ import annotations

from pathlib import Path

from .base import DataError, Dataset, stratified_split, take


def load_saved(path: Path, split: str, seed: int, limit: int | None) -> Dataset:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a datasets.save_to_disk directory; reading it needs `pip install datasets`") from None
    obj = datasets.load_from_disk(str(path))
    if isinstance(obj, datasets.DatasetDict):
        aliases = {"val": ("validation", "val", "valid", "dev")}.get(split, (split,))
        key = next((k for k in aliases if k in obj), None)
        if key is None:
            raise DataError(f"{path} has splits {list(obj)}; it lacks {split!r}")
        table, presplit = obj[key], True
    else:
        table, presplit = obj, False
    cols = table.column_names
    if "label" not in cols:
        raise DataError(f"{path} has no 'label' column (columns: {', '.join(cols)})")
    feature = table.features["label"]
    names = list(getattr(feature, "names", []) or [])
    labels = table["label"]
    if not names:
        names = sorted({str(v) for v in labels})
        labels = [names.index(str(v)) for v in labels]
    if "text" in cols:
        examples = [{"text": t, "label": int(l)} for t, l in zip(table["text"], labels)]
        task = "text-classification"
    elif "image" in cols:
        import numpy as np
        import torch

        examples = [{"image": torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1), "label": int(l)} for im, l in zip(table["image"], labels)]
        task = "image-classification"
    else:
        raise DataError(f"{path} needs a 'text' or 'image' column (columns: {', '.join(cols)})")
    if not presplit:
        idx = stratified_split([e["label"] for e in examples], seed)[split]
        examples = [examples[i] for i in idx]
    return Dataset(path.name, task, take(examples, limit, seed), names)
