"""Corrupted digits (MNIST-C style) through corrupt-tta's ImageNet-C corruptions.

``mnist-c:<corruption>:<severity>`` (or ``digits-c:...``) is the base set's split with every image
corrupted by ``corrupt_tta.corrupt`` (Hendrycks & Dietterich, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations", https://arxiv.org/abs/1903.12261).

corrupt-tta works on any ``(H, W, 3)`` array of at least 2x2 pixels, so the 28x28 digits are
corrupted at their own size (grey repeated to three channels, the result averaged back to grey); no
upsampling. Corruption is deterministic: image ``i`` of a split always gets the same noise for a
given seed, corruption and severity, whatever ``limit`` selects. Results are cached in memory per
process.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import zlib
from collections import OrderedDict
from typing import Callable, Iterator

import numpy as np

from .base import DataError, Dataset
from .images import DIGITS, digits_split, image_examples, mnist_split

#: the 15 standard ImageNet-C corruptions (noise, blur, weather, digital): the benchmark set
CORRUPTIONS = [
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression",
]
#: corrupt-tta's 4 extra corruptions (ImageNet-C's held-out validation set)
EXTRA_CORRUPTIONS = ["speckle_noise", "gaussian_blur", "spatter", "saturate"]

#: base sets a corruption can be applied to: name → (split, seed, limit) → (images, labels, indices)
BASES: dict[str, Callable[[str, int, int | None], tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
    "mnist": mnist_split,
    "digits": digits_split,
}

_CACHE_SIZE = (
    32  # (base, split, corruption, severity, seed) entries; 10k MNIST images = 7.8 MB each
)
_cache: OrderedDict[tuple, dict[int, np.ndarray]] = OrderedDict()


def corruption_names(extra: bool = True) -> list[str]:
    """The 15 standard corruption names, followed by the 4 extras unless ``extra=False``."""
    return CORRUPTIONS + (EXTRA_CORRUPTIONS if extra else [])


@contextlib.contextmanager
def _seeded_corrupt_tta(seed: int) -> Iterator[None]:
    """Make corrupt-tta's randomness reproducible, restoring the global state afterwards.

    corrupt-tta draws from numpy's global RNG, except ``impulse_noise`` which calls skimage's
    ``random_noise`` without an ``rng`` (fresh OS entropy on every call); that one function is
    swapped for a seeded call while inside this block.
    """
    from corrupt_tta import corruptions

    state = np.random.get_state()
    original = corruptions.random_noise
    np.random.seed(seed)
    corruptions.random_noise = functools.partial(original, rng=np.random.default_rng(seed))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skimage/scipy deprecation chatter on every image
            yield
    finally:
        corruptions.random_noise = original
        np.random.set_state(state)


def corrupt_images(
    images: np.ndarray, indices: np.ndarray, name: str, severity: int, seed: int
) -> np.ndarray:
    """Corrupt grey uint8 ``(N, H, W)`` images; ``indices`` (their positions in the full split) seed
    each image so a subset gets exactly the corruption the full set would."""
    import corrupt_tta

    out = np.empty_like(images)
    salt = zlib.crc32(f"{name}:{severity}:{seed}".encode())
    for k, (img, i) in enumerate(zip(images, indices)):
        with _seeded_corrupt_tta((salt + int(i) * 7919) % 2**32):
            rgb = np.repeat(img[:, :, None], 3, axis=2)  # (H, W, 3) uint8, what corrupt-tta expects
            c = np.asarray(corrupt_tta.corrupt(rgb, severity, name), dtype=np.float64)
        out[k] = np.clip(c.mean(axis=2), 0, 255).round().astype(np.uint8)
    return out


def parse_corrupt_spec(spec: str) -> tuple[str, str, int]:
    """``'mnist-c:fog:3'`` → ``('mnist', 'fog', 3)`` with a one-line error naming the fix."""
    head, _, rest = spec.partition(":")
    base = head[: -len("-c")] if head.endswith("-c") else ""
    name, _, severity = rest.partition(":")
    example = f"{head}:fog:3"
    if base not in BASES:
        raise DataError(
            f"{spec!r}: corrupted sets are {', '.join(b + '-c' for b in BASES)}, e.g. mnist-c:fog:3"
        )
    if not name or not severity:
        raise DataError(f"{spec!r}: write {head}:<corruption>:<severity>, e.g. {example}")
    if name not in corruption_names():
        raise DataError(f"unknown corruption {name!r}; choose from {', '.join(corruption_names())}")
    if not severity.isdigit() or int(severity) not in (1, 2, 3, 4, 5):
        raise DataError(f"corruption severity must be 1-5, got {severity!r}; e.g. {example}")
    return base, name, int(severity)


def corrupted(spec: str, split: str, seed: int, limit: int | None) -> Dataset:
    """The dataset ``<base>-c:<corruption>:<severity>``: a split of the base set, corrupted."""
    base, name, severity = parse_corrupt_spec(spec)
    images, labels, indices = BASES[base](split, seed, limit)
    key = (base, split, name, severity, seed)
    done = _cache.setdefault(key, {})
    _cache.move_to_end(key)
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    todo = [k for k, i in enumerate(indices) if int(i) not in done]
    if todo:
        fresh = corrupt_images(images[todo], indices[todo], name, severity, seed)
        done.update({int(indices[k]): img for k, img in zip(todo, fresh)})
    out = np.stack([done[int(i)] for i in indices]) if len(indices) else images
    return Dataset(
        f"{base}-c:{name}:{severity}",
        "image-classification",
        image_examples(out, labels),
        list(DIGITS),
    )
