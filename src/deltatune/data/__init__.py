"""Bundled real datasets by name, and the user's own data.

``load_data(spec, split)`` where ``spec`` is a bundled name (``bbc-news``, ``tweet-sentiment``,
``tweet-sentiment:apple,cars``, ``mnist``, ``digits``, ``mnist-c:fog:3``, ``bbc-news-text``) or a path
(a ``.csv``/``.jsonl`` file with ``text`` and ``label`` columns, a class-per-folder image tree, or a
``datasets.save_to_disk`` directory).
"""

from __future__ import annotations

from pathlib import Path

from .base import SPLITS, DataError, Dataset, stratified_split
from .images import CORRUPTIONS, corruption_names, digits, image_folder, mnist, mnist_c, restricted_load
from .text import DOMAIN_NAMES, SENTIMENTS, bbc_news, bbc_news_text, tweet_domain, tweet_sentiment, user_text

_BUNDLED = {
    "bbc-news": "BBC News articles, 5 topics (text classification)",
    "bbc-news-text": "BBC News articles as plain text (causal-LM tuning)",
    "tweet-sentiment": "38k tweets, negative/neutral/positive; ':airlines,nfl,apple,cars,other' selects domains",
    "mnist": "MNIST digits 28x28 grey (50k/10k/10k)",
    "digits": "sklearn 8x8 digits upscaled to 28x28 (a second digits domain)",
    "mnist-c": "'mnist-c:<corruption>:<severity>' MNIST under a corrupt-tta corruption",
}


def available_datasets() -> list[str]:
    return list(_BUNDLED)


def describe_datasets() -> dict[str, str]:
    return dict(_BUNDLED)


def load_data(spec: str, split: str = "train", *, seed: int = 0, limit: int | None = None) -> Dataset:
    """Load a bundled dataset by name or the user's data from a path (see module docstring)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    name, _, arg = spec.partition(":")
    if name == "bbc-news" and not arg:
        return bbc_news(split, seed, limit)
    if name == "bbc-news-text" and not arg:
        return bbc_news_text(split, seed, limit)
    if name == "tweet-sentiment":
        return tweet_sentiment(split, seed, limit, arg or None)
    if name == "mnist" and not arg:
        return mnist(split, seed, limit)
    if name == "digits" and not arg:
        return digits(split, seed, limit)
    if name == "mnist-c":
        corruption, _, severity = arg.partition(":")
        if not corruption or not severity.isdigit():
            raise DataError(f"{spec!r}: write mnist-c:<corruption>:<severity>, e.g. mnist-c:fog:3")
        return mnist_c(corruption, int(severity), split, seed, limit)
    path = Path(spec)
    if path.exists():
        if path.is_file() and path.suffix.lower() in (".csv", ".jsonl", ".json"):
            return user_text(path, split, seed, limit)
        if path.is_dir() and (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            from .hf_disk import load_saved

            return load_saved(path, split, seed, limit)
        if path.is_dir():
            return image_folder(path, split, seed, limit)
        raise DataError(f"{path}: expected a .csv/.jsonl file, an image folder or a datasets.save_to_disk directory")
    if "/" in spec or spec.endswith((".csv", ".jsonl")):
        raise DataError(f"{spec} does not exist")
    raise DataError(f"unknown dataset {spec!r}; bundled: {', '.join(_BUNDLED)} (or pass a CSV/JSONL/folder path)")


__all__ = [
    "CORRUPTIONS", "DOMAIN_NAMES", "DataError", "Dataset", "SENTIMENTS", "SPLITS", "available_datasets",
    "corruption_names", "describe_datasets", "load_data", "restricted_load", "stratified_split", "tweet_domain",
]
