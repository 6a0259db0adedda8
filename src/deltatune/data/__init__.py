"""Bundled real datasets by name, and the user's own data.

``load_data(spec, split)`` where ``spec`` is a bundled name (``bbc-news``, ``bbc-news-text``,
``tweet-sentiment``, ``tweet-sentiment:apple,cars``, ``mnist``, ``digits``, ``mnist-c:fog:3``,
``digits-c:fog:3``) or a path (a ``.csv``/``.jsonl`` file with ``text`` and ``label`` columns, a
class-per-folder image tree, or a ``datasets.save_to_disk`` directory). See docs/data-and-models.md.
Chat, preference and plain-text data (``tweet-sentiment-chat``, ``bbc-news-pref``, the user's
chat/preference/text files and ``.txt`` documents): :mod:`.chat`, docs/language-models.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..core.registry import Registry
from .base import DEFAULT_FRACTIONS, SPLITS, DataError, Dataset, check_fractions, stratified_split
from .chat import CHAT_SETS, bundled_chat, user_file
from .corrupt import CORRUPTIONS, EXTRA_CORRUPTIONS, corruption_names
from .images import digits, image_folder, mnist, restricted_load
from .text import (
    DOMAIN_NAMES,
    SENTIMENTS,
    bbc_news,
    bbc_news_text,
    tweet_domain,
    tweet_sentiment,
)

#: every bundled dataset by name, with its one-line description
DATASETS: Registry[str] = Registry(
    "dataset", DataError,
    message="unknown {kind} {name!r}; bundled: {known} (or pass a CSV/JSONL/folder path){hint}")
DATASETS.register("bbc-news", "BBC News articles, 5 topics (text classification)")
DATASETS.register("bbc-news-text", "BBC News articles as plain text (causal-LM tuning)")
DATASETS.register("tweet-sentiment", "38k tweets, negative/neutral/positive; "
                  "':airlines,nfl,apple,cars,other' selects domains")
for _name, _about in CHAT_SETS.items():  # chat and preference tasks: deltatune.data.chat
    DATASETS.register(_name, _about)
DATASETS.register("mnist", "MNIST digits 28x28 grey (50k/10k/10k)")
DATASETS.register("digits", "sklearn 8x8 digits drawn at MNIST size (a second digits domain)")
DATASETS.register("mnist-c",
                  "'mnist-c:<corruption>:<severity>' MNIST under a corrupt-tta corruption")
DATASETS.register("digits-c", "'digits-c:<corruption>:<severity>' sklearn digits "
                  "under a corrupt-tta corruption")
_SIMPLE = {"bbc-news": bbc_news, "bbc-news-text": bbc_news_text, "mnist": mnist, "digits": digits}
_TEXT_SUFFIXES = (".csv", ".jsonl", ".json", ".txt")


def available_datasets() -> list[str]:
    """Bundled dataset names (the ``-c`` sets take ``:<corruption>:<severity>``)."""
    return list(DATASETS.names())


def describe_datasets() -> dict[str, str]:
    """Bundled dataset names with a one-line description each (CLI help)."""
    return dict(DATASETS.items())


def load_data(spec: str, split: str = "train", *, seed: int = 0, limit: int | None = None,
              fractions: Sequence[float] | None = None, encoding: str | None = None) -> Dataset:
    """A split of a bundled dataset by name, or of the user's data at a path (see module docstring).

    The split depends only on ``seed`` (and ``fractions``); ``limit`` keeps a seeded random subset
    of that split. ``fractions`` (train, val, test; default 0.8, 0.1, 0.1) are the proportions of
    the splits deltatune draws itself (everything but mnist, the ``-c`` sets, saved DatasetDicts and
    CSV/JSONL files with a ``split`` column, which refuse them). ``encoding`` is that of a
    CSV/JSON(L) file (default UTF-8, decoded strictly; e.g. ``"latin-1"``); other data ignore it.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of examples, got {limit}")
    name, _, arg = spec.partition(":")
    drawn = check_fractions(fractions)  # the proportions of a split deltatune draws itself

    def own_split(what: str) -> None:
        if fractions is not None:
            raise DataError(f"{what} has its own split: drop the split fractions")

    if name == "mnist" and not arg:
        own_split("mnist (the file's 50k/10k/10k)")
        return mnist(split, seed, limit)
    if name in _SIMPLE and not arg:
        return _SIMPLE[name](split, seed, limit, drawn)
    if name == "tweet-sentiment":
        return tweet_sentiment(split, seed, limit, arg or None, drawn)
    if name in CHAT_SETS:
        return bundled_chat(name, arg, split, seed, limit, drawn)
    if name.endswith("-c") and name in DATASETS:
        from .corrupt import corrupted

        own_split(f"{spec} (the test images of its source set)")
        return corrupted(spec, split, seed, limit)
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() in _TEXT_SUFFIXES:
            return user_file(
                path, split, seed, limit, None if fractions is None else drawn, encoding
            )
        raise DataError(f"{path}: unsupported file type; pass a .csv/.jsonl/.txt file, an image "
                        "folder or a datasets.save_to_disk directory")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            from .hf_disk import load_saved

            if (path / "dataset_dict.json").is_file():
                own_split(f"{path} (a DatasetDict)")
            return load_saved(path, split, seed, limit, drawn)
        return image_folder(path, split, seed, limit, drawn)
    if name in _SIMPLE:
        raise DataError(f"{name} takes no ':' argument; use {name!r}")
    if "/" in spec or "\\" in spec or spec.lower().endswith(_TEXT_SUFFIXES):
        raise DataError(f"{spec} does not exist; check the path")
    raise DataError(DATASETS.unknown(spec))


__all__ = [
    "CORRUPTIONS",
    "DATASETS",
    "DEFAULT_FRACTIONS",
    "DOMAIN_NAMES",
    "EXTRA_CORRUPTIONS",
    "SENTIMENTS",
    "SPLITS",
    "DataError",
    "Dataset",
    "available_datasets",
    "corruption_names",
    "describe_datasets",
    "load_data",
    "restricted_load",
    "stratified_split",
    "tweet_domain",
]
