"""Datasets written with ``datasets.save_to_disk`` (a Dataset or a DatasetDict directory).

Read with pyarrow directly (the ``.arrow`` shards listed in ``state.json``, features from
``dataset_info.json``) so that the ``datasets`` package itself is not needed; images stored as
encoded bytes are decoded with PIL. Nothing is unpickled.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from .base import DEFAULT_FRACTIONS, DataError, Dataset, require_classes, stratified_split, take

_SPLIT_ALIASES = {
    "train": ("train",),
    "val": ("validation", "val", "valid", "dev"),
    "test": ("test",),
}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{path} is unreadable ({exc}); save the dataset again with save_to_disk"
        ) from None


def _read_table(folder: Path):
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError(f"{folder} is a datasets.save_to_disk directory; reading it needs "
                        "`pip install datasets` (or pyarrow)") from None
    state = _read_json(folder / "state.json") if (folder / "state.json").is_file() else {}
    files = [folder / f["filename"] for f in state.get("_data_files", [])] or sorted(
        folder.glob("*.arrow")
    )
    if not files:
        raise DataError(f"{folder} holds no .arrow files; save the dataset again with save_to_disk")
    tables = []
    for f in files:
        try:
            with pa.memory_map(str(f)) as source:
                tables.append(pa.ipc.open_stream(source).read_all())
        except (OSError, pa.ArrowException) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"{f} is not a readable Arrow stream ({reason}); save the dataset again with "
                "save_to_disk"
            ) from None
    try:
        return pa.concat_tables(tables)
    except pa.ArrowException:
        raise DataError(
            f"{folder}: its .arrow files hold different columns; save the dataset again with "
            "save_to_disk"
        ) from None


def _decode_image(cell: Any, where: Path):
    import torch
    from PIL import Image

    from .images import to_rgb

    data = cell.get("bytes") if isinstance(cell, dict) else None
    if not data:
        raise DataError(
            f"{where}: an image is stored by path only; save it with the image bytes embedded"
        )
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = to_rgb(im)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a bad image
        raise DataError(
            f"{where}: an image is not readable ({exc}); fix or drop that row"
        ) from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, H, W) uint8


def load_saved(path: Path, split: str, seed: int, limit: int | None,
               fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> Dataset:
    """One split of a saved Dataset (seeded split, 80/10/10 by default) or DatasetDict (its own
    splits)."""
    folder, presplit = path, False
    if (path / "dataset_dict.json").is_file():
        splits = _read_json(path / "dataset_dict.json").get("splits", [])
        key = next((k for k in _SPLIT_ALIASES[split] if k in splits), None)
        if key is None:
            names = " or ".join(_SPLIT_ALIASES[split])
            raise DataError(
                f"{path} has splits {splits} but none named {names}; add one or pick another split"
            )
        folder, presplit = path / key, True
    info = folder / "dataset_info.json"
    features = _read_json(info).get("features", {}) if info.is_file() else {}
    table = _read_table(folder)
    cols = table.column_names
    if "label" not in cols:
        raise DataError(f"{path} has no 'label' column (columns: {', '.join(cols)}); add one")
    raw = table.column("label").to_pylist()
    feature = features.get("label", {})
    names = [str(n) for n in feature.get("names", [])] if isinstance(feature, dict) else []
    # datasets marks a missing label as None, or -1 in a ClassLabel column (unlabelled test splits)
    missing = [
        i
        for i, v in enumerate(raw)
        if v is None or (names and v == -1) or (isinstance(v, float) and v != v)
    ]
    if missing:
        raise DataError(f"{path}: row {missing[0]} has no label ({len(missing)} row(s) in all); "
                        "label them or filter them out before save_to_disk")
    bad = next((v for v in raw if isinstance(v, (dict, list, bytes))), None)
    if bad is not None:
        raise DataError(
            f"{path}: the label column holds {type(bad).__name__} values; labels are strings or "
            "numbers"
        )
    if names:
        out_of_range = [v for v in raw if not isinstance(v, int) or not 0 <= v < len(names)]
        if out_of_range:
            raise DataError(
                f"{path}: label {out_of_range[0]!r} is outside the {len(names)} ClassLabel names; "
                "fix the labels"
            )
        labels = list(raw)  # ClassLabel stores indices into names
    else:
        from .user_files import label_key, label_order

        keys = [label_key(v) for v in raw]
        if None in keys:  # "" or "nan"
            raise DataError(
                f"{path}: row {keys.index(None)} has an empty label ({keys.count(None)} row(s) in "
                "all); label them or filter them out before save_to_disk"
            )
        names = label_order(set(keys))
        index = {n: i for i, n in enumerate(names)}
        labels = [index[k] for k in keys]
    if "text" in cols:
        task, field = "text-classification", "text"
    elif "image" in cols:
        task, field = "image-classification", "image"
    else:
        raise DataError(f"{path} needs a 'text' or 'image' column (columns: {', '.join(cols)})")
    idx = list(range(len(labels))) if presplit else stratified_split(labels, seed, fractions)[split]
    require_classes(str(path), split, [labels[i] for i in idx], names)
    idx = take(idx, limit, seed)
    values = table.column(field).take(idx).to_pylist() if idx else []
    if field == "text":
        blank = next(
            (i for v, i in zip(values, idx) if not isinstance(v, str) or not v.strip()), None
        )
        if blank is not None:
            raise DataError(
                f"{path}: row {blank} has no text (or an empty one); fill it in or filter it out"
            )
        examples = [{"text": str(v), "label": labels[i]} for v, i in zip(values, idx)]
    else:
        examples = [
            {"image": _decode_image(v, path), "label": labels[i]} for v, i in zip(values, idx)
        ]
    return Dataset(path.name, task, examples, names)
