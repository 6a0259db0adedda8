"""Image data: MNIST (restricted unpickler), sklearn digits, MNIST-C corruptions, image folders."""

from __future__ import annotations

import functools
import gzip
import io
import pickle
from pathlib import Path

import numpy as np
import torch

from .base import DataError, Dataset, check_split, stratified_split, take
from .text import _package_dir

#: the 15 standard ImageNet-C corruptions (the benchmark set) and corrupt-tta's 4 extras
CORRUPTIONS = [
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression",
]
EXTRA_CORRUPTIONS = ["speckle_noise", "gaussian_blur", "spatter", "saturate"]
DIGITS = [str(i) for i in range(10)]


def corruption_names(extra: bool = False) -> list[str]:
    return CORRUPTIONS + (EXTRA_CORRUPTIONS if extra else [])


class _NumpyOnly(pickle.Unpickler):
    """Admits only what a pickle of plain numpy arrays needs; anything else is refused."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            import numpy.core.multiarray  # noqa: F401  (numpy 2 maps numpy.core to numpy._core)
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed in this file")


def restricted_load(data: bytes):
    return _NumpyOnly(io.BytesIO(data), encoding="latin1").load()  # a Python 2 pickle


@functools.lru_cache(maxsize=1)
def _mnist_arrays():
    path = _package_dir("mnist") / "data" / "mnist.pkl.gz"
    with gzip.open(path, "rb") as fh:
        (tx, ty), (vx, vy), (sx, sy) = restricted_load(fh.read())
    to_u8 = lambda a: (np.asarray(a, dtype=np.float32).reshape(-1, 28, 28) * 255).round().astype(np.uint8)  # noqa: E731
    return {"train": (to_u8(tx), np.asarray(ty)), "val": (to_u8(vx), np.asarray(vy)), "test": (to_u8(sx), np.asarray(sy))}


def _image_examples(images: np.ndarray, labels: np.ndarray) -> list[dict]:
    # (N, H, W) grey or (N, H, W, 3) → uint8 tensors (C, H, W)
    t = torch.from_numpy(np.ascontiguousarray(images))
    t = t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2)
    return [{"image": t[i], "label": int(labels[i])} for i in range(len(labels))]


def mnist(split: str, seed: int, limit: int | None) -> Dataset:
    """MNIST with the file's own split: 50k train / 10k val / 10k test, grey 28x28 uint8."""
    check_split(split)
    x, y = _mnist_arrays()[split]
    if limit is not None and limit < len(y):
        idx = np.sort(np.random.default_rng(seed + 7).choice(len(y), limit, replace=False))
        x, y = x[idx], y[idx]
    return Dataset("mnist", "image-classification", _image_examples(x, y), list(DIGITS))


def digits(split: str, seed: int, limit: int | None) -> Dataset:
    """sklearn's 8x8 digits upscaled to 28x28 (nearest): a second digits domain."""
    check_split(split)
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images / 16.0 * 255).astype(np.uint8)
    imgs = np.pad(np.kron(imgs, np.ones((3, 3), dtype=np.uint8)), ((0, 0), (2, 2), (2, 2)))  # 24 → 28
    idx = stratified_split(list(d.target), seed)[split]
    ex = _image_examples(imgs[idx], d.target[idx])
    return Dataset("digits", "image-classification", take(ex, limit, seed), list(DIGITS))


@functools.lru_cache(maxsize=64)
def _corrupted(base_split: str, name: str, severity: int, seed: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    import corrupt_tta

    x, y = _mnist_arrays()[base_split]
    if limit is not None and limit < len(y):
        idx = np.sort(np.random.default_rng(seed + 7).choice(len(y), limit, replace=False))
        x, y = x[idx], y[idx]
    out = np.empty((len(x), 28, 28), dtype=np.uint8)
    state = np.random.get_state()
    try:
        for i, img in enumerate(x):
            np.random.seed((seed * 1_000_003 + i) % 2**32)  # corrupt-tta draws from numpy's global RNG
            rgb = np.repeat(img[:, :, None], 3, axis=2).astype(np.float32)
            c = np.asarray(corrupt_tta.corrupt(rgb, severity, name), dtype=np.float32)
            out[i] = np.clip(c.mean(axis=2), 0, 255).round().astype(np.uint8)
    finally:
        np.random.set_state(state)
    return out, y


def mnist_c(corruption: str, severity: int, split: str, seed: int, limit: int | None) -> Dataset:
    """MNIST images under a corrupt-tta corruption (deterministic per seed; cached per process)."""
    check_split(split)
    if corruption not in CORRUPTIONS + EXTRA_CORRUPTIONS:
        raise DataError(f"unknown corruption {corruption!r}; choose from {', '.join(CORRUPTIONS + EXTRA_CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise DataError(f"corruption severity must be 1-5, got {severity}")
    x, y = _corrupted(split, corruption, severity, seed, limit)
    return Dataset(f"mnist-c:{corruption}:{severity}", "image-classification", _image_examples(x, y), list(DIGITS))


def image_folder(path: Path, split: str, seed: int, limit: int | None) -> Dataset:
    """A class-per-folder image tree (``root/<class>/<image>``), seeded stratified split."""
    check_split(split)
    from PIL import Image

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{path} has no class sub-folders; expected root/<class>/<image files>")
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((path / name).iterdir()) if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")]
    if not files:
        raise DataError(f"{path} holds no image files (png/jpg/bmp/gif/webp)")
    idx = stratified_split([c for _, c in files], seed)[split]
    examples = []
    for i in idx:
        f, c = files[i]
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad image file
            raise DataError(f"{f} is not a readable image ({exc})") from None
        examples.append({"image": torch.from_numpy(arr.copy()).permute(2, 0, 1), "label": c})
    return Dataset(path.name, "image-classification", take(examples, limit, seed), classes)
