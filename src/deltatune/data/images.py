"""Image data: MNIST (restricted unpickler), sklearn digits as MNIST look-alikes, image folders.

Images are uint8 tensors ``(C, H, W)``; the digit sets keep their single grey channel
(``(1, 28, 28)``) and the model's collate expands grey to RGB where a model wants three channels.
"""

from __future__ import annotations

import functools
import gzip
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import (
    DEFAULT_FRACTIONS,
    DataError,
    Dataset,
    check_split,
    require_classes,
    stratified_split,
    take,
)
from .text import _package_dir

DIGITS = [str(i) for i in range(10)]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _numpy_allow_list() -> dict[tuple[str, str], Any]:
    # numpy 2 moved numpy.core to numpy._core; old pickles still name numpy.core.multiarray
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    return {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
    }


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a pickle of plain numpy arrays needs.

    ``pickle.load`` would import and call any global the file names (``os.system``, ...); this one
    hands out the objects of a fixed allow-list itself and refuses everything else, so a tampered
    file fails with :class:`DataError` before any of its code can run.
    """

    def find_class(self, module: str, name: str) -> Any:
        allowed = _numpy_allow_list()
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise DataError(
            f"refusing to unpickle {module}.{name}: only numpy arrays are allowed in this file"
        )


def restricted_load(data: bytes) -> Any:
    """Unpickle ``data`` admitting only numpy arrays (latin-1 decoding for Python 2 pickles)."""
    return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


@functools.lru_cache(maxsize=1)
def mnist_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST as uint8 ``(N, 28, 28)`` images and int64 labels per split (loaded once per
    process)."""
    path = _package_dir("mnist") / "data" / "mnist.pkl.gz"
    with gzip.open(path, "rb") as fh:
        parts = restricted_load(fh.read())
    out = {}
    for split, (x, y) in zip(("train", "val", "test"), parts):
        # the file stores floats in [0, 1], flattened to 784
        images = (
            (np.asarray(x, dtype=np.float32).reshape(-1, 28, 28) * 255).round().astype(np.uint8)
        )
        out[split] = (images, np.asarray(y, dtype=np.int64))
    return out


def image_examples(images: np.ndarray, labels: np.ndarray) -> list[dict]:
    """``(N, H, W)`` grey or ``(N, H, W, 3)`` uint8 arrays → examples with ``(C, H, W)`` tensors."""
    t = torch.from_numpy(np.ascontiguousarray(images))
    t = t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2)
    return [{"image": t[i], "label": int(labels[i])} for i in range(len(labels))]


def sample_indices(n: int, limit: int | None, seed: int) -> np.ndarray:
    """All of ``range(n)``, or a seeded random ``limit`` of them in increasing order."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise DataError(f"limit must be positive, got {limit}")
    return np.sort(np.random.default_rng(seed + 7).choice(n, limit, replace=False))


def mnist_split(
    split: str, seed: int, limit: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, labels and their indices in the file's split (a seeded subset when ``limit``)."""
    check_split(split)
    x, y = mnist_arrays()[split]
    idx = sample_indices(len(y), limit, seed)
    return x[idx], y[idx], idx


def mnist(split: str, seed: int, limit: int | None) -> Dataset:
    """MNIST with the file's own split: 50k train / 10k val / 10k test, grey ``(1, 28, 28)``
    uint8."""
    x, y, _ = mnist_split(split, seed, limit)
    return Dataset("mnist", "image-classification", image_examples(x, y), list(DIGITS))


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1,797 8x8 digits made to look like MNIST: 20x20 digit box centred in 28x28."""
    from sklearn.datasets import load_digits

    d = load_digits()
    small = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(
        1
    )  # (N, 1, 8, 8) in [0, 1]
    # MNIST digits are anti-aliased into a 20x20 box with a 4 px margin; bilinear upscaling keeps
    # the strokes smooth instead of showing 8x8 blocks
    box = torch.nn.functional.interpolate(
        small, size=(20, 20), mode="bilinear", align_corners=False
    )
    images = torch.nn.functional.pad(box, (4, 4, 4, 4)).squeeze(1)
    return (images * 255).round().clamp(0, 255).to(torch.uint8).numpy(), d.target.astype(np.int64)


def digits_split(
    split: str,
    seed: int,
    limit: int | None,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    check_split(split)
    x, y = digits_arrays()
    idx = np.asarray(stratified_split(list(y), seed, fractions)[split], dtype=np.int64)
    idx = idx[sample_indices(len(idx), limit, seed)]
    return x[idx], y[idx], idx


def digits(
    split: str,
    seed: int,
    limit: int | None,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> Dataset:
    """sklearn digits as 28x28 MNIST look-alikes (a second digits domain), seeded split (80/10/10 by
    default)."""
    x, y, _ = digits_split(split, seed, limit, fractions)
    return Dataset("digits", "image-classification", image_examples(x, y), list(DIGITS))


def to_rgb(im: Any) -> np.ndarray:
    """A PIL image as ``(H, W, 3)`` uint8. 16/32-bit grey (PNG, TIFF) and float images are scaled to
    8 bits: PIL's own ``convert("RGB")`` clips them at 255, which turns a 16-bit image white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if im.mode.startswith("I;16") or 255 < top <= 65535:
            arr = arr / 257.0  # 65535 -> 255
        elif im.mode == "F" and top <= 1.0:
            arr = arr * 255.0  # floats in [0, 1]
        grey = np.clip(arr, 0, 255).round().astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def image_folder(path: Path, split: str, seed: int, limit: int | None,
                 fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> Dataset:
    """A class-per-folder image tree (``root/<class>/<image>``) as RGB, seeded stratified split."""
    check_split(split)
    from PIL import Image

    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"{path} has no class sub-folders; expected {path.name}/<class>/<image files>"
        )
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((path / name).iterdir())
             if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    kinds = ", ".join(s[1:] for s in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{path} holds no image files ({kinds}) in its class folders")
    present = {c for _, c in files}
    empty = [name for c, name in enumerate(classes) if c not in present]
    if empty:  # an empty class would size the model's head with a class it never sees
        shown = ", ".join(
            n if n.isprintable() else repr(n) for n in empty
        )  # a name may hold a newline
        raise DataError(f"{path}: class folder(s) {shown} hold no image files ({kinds}); "
                        "add images or remove the folder")
    idx = stratified_split([c for _, c in files], seed, fractions)[split]
    require_classes(str(path), split, [files[i][1] for i in idx], classes)
    examples = []
    for i in take(idx, limit, seed):  # choose first, then decode only what is used
        f, c = files[i]
        try:
            with Image.open(f) as im:
                arr = to_rgb(im)
        except Exception as exc:  # noqa: BLE001 - any decoder failure means a bad image file
            shown = str(f) if str(f).isprintable() else repr(str(f))
            raise DataError(f"{shown} is not a readable image ({' '.join(str(exc).split())}); "
                            "remove or replace it") from None
        examples.append({"image": torch.from_numpy(arr.copy()).permute(2, 0, 1), "label": c})
    return Dataset(path.name, "image-classification", examples, classes)
