"""Language-model data: the user's chat, preference and plain-text files, and the bundled chat and
preference tasks built from the classification corpora.

Files (CSV with a header row, JSONL, or a JSON array; read strictly by :mod:`.user_files`) are
recognised by their columns; each shape is normalised to the examples of :mod:`deltatune.lm`:

* ``messages`` (a list of ``{"role", "content"}``; in a CSV, that list as JSON in its cell)
  → ``{"messages"}``, task ``chat``;
* ``prompt`` + ``completion`` (strings or message lists) → ``{"messages": prompt + completion}``
  (a prompt string becomes a user turn, a completion string an assistant turn);
* ``instruction`` (+ ``input``) + ``output`` (alpaca) → a user turn (the instruction, then a blank
  line and the input when there is one) and an assistant turn;
* ``prompt`` + ``chosen`` + ``rejected`` → ``{"prompt", "chosen", "rejected"}`` message lists,
  task ``preference`` (a prompt string becomes a user turn, chosen/rejected strings assistant
  turns);
* ``text`` alone → ``{"text"}``, task ``text``; a ``.txt`` file is one document, split into one
  example per paragraph (blank-line separated).

A ``label`` column makes a file text classification (:func:`.user_files.user_text`), as before. An
optional ``split`` column fixes the split as for classification files, else it is drawn seeded
(80/10/10), identical rows kept together. Other columns are ignored (``task``/``domain`` are kept).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from .base import DEFAULT_FRACTIONS, DataError, Dataset, check_split, stratified_split, take
from .text import SENTIMENTS, bbc_news, tweet_sentiment
from .user_files import _VAL_NAMES, GROUP_COLUMNS, _shown, decode, read_rows, user_text

Messages = list[dict[str, str]]
#: the roles a conversation may hold
ROLES = ("system", "user", "assistant")

#: the accepted shapes by their columns, named by the error of a file that matches none
ACCEPTED = (
    "text+label (classification), messages (chat), prompt+completion, "
    "instruction(+input)+output (alpaca), prompt+chosen+rejected (preference), text alone"
)
_SHAPES = {  # shape -> the columns that make it (every one present)
    "preference": ("prompt", "chosen", "rejected"),
    "messages": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}
_TASK = {"preference": "preference", "text": "text"}  # every other shape is chat


def conversation_problem(messages: Any, *, start: int = 0) -> str | None:
    """What is wrong with ``messages`` as a conversation to train on (``None``: nothing): a list of
    ``{"role", "content"}`` turns with known roles and string contents, not opening with the
    assistant, with an assistant turn at index ``start`` or later (what the model learns)."""
    if not isinstance(messages, list) or not messages:
        return 'messages must be a non-empty list of {"role": ..., "content": ...} objects'
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f'message {i} is not a {{"role": ..., "content": ...}} object'
        if m["role"] not in ROLES:
            shown = repr(m["role"])[:40]
            return f"message {i} has the unknown role {shown}; use one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str):
            return f"message {i} has a {type(m['content']).__name__} as its content, not a string"
    if messages[0]["role"] == "assistant":
        return "the conversation opens with an assistant turn; put the user's turn first"
    if not any(m["role"] == "assistant" for m in messages[start:]):
        return (
            'it has no assistant turn; add the answer to learn as {"role": "assistant", '
            '"content": ...}'
        )
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages[start:]):
        return "an assistant turn is empty; fill in the answer to learn or remove the row"
    return None


def shape_of(columns: list[str]) -> str | None:
    """The language-model shape of a file with these columns (``None``: none, or classification)."""
    if "label" in columns:
        return None
    found = [s for s, need in _SHAPES.items() if all(c in columns for c in need)]
    if "preference" in found:  # its prompt column would also read as prompt+completion's
        found = [s for s in found if s != "prompt-completion"]
    if len(found) > 1:
        raise DataError(f"the columns match several shapes ({' and '.join(found)}); keep the "
                        "columns of one")
    if found:
        return found[0]
    return "text" if set(columns) - {"split"} == {"text"} else None


def _ref(path: Path, where: str) -> str:
    """``file:line`` (JSONL, CSV) or ``file (record n)`` (a JSON array) for a one-line message."""
    kind, _, n = where.partition(" ")
    return f"{path}:{n}" if kind == "line" else f"{path} ({where})"


def _turns(value: Any, role: str, ref: str, column: str, csv: bool) -> Messages:
    """A column's value as messages: a string is one ``role`` turn (in a CSV, ``messages`` is the
    one column holding JSON), a list is taken as messages."""
    if column == "messages" and csv and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f'{ref}: the messages cell is not JSON; write a JSON list of '
                            '{"role": ..., "content": ...} objects') from None
    if isinstance(value, str) and column != "messages":
        if not value.strip():
            raise DataError(f"{ref}: {column} is empty; fill it in or remove the row")
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        what = "nothing" if value is None else f"a {type(value).__name__}"
        wanted = "a message list" if column == "messages" else "a string or a message list"
        raise DataError(f"{ref}: {column} holds {what}; write {wanted}")
    for m in value:  # keep role and content only (names, tool calls: not trained on)
        if isinstance(m, dict) and "role" in m and "content" in m:
            continue
        raise DataError(f'{ref}: {column} has an item that is not a {{"role": ..., '
                        '"content": ...} object; fix the row')
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _example(shape: str, r: dict[str, Any], ref: str, csv: bool) -> dict[str, Any]:
    """One row normalised to the :mod:`deltatune.lm` contract, checked."""
    if shape == "text":
        text = r.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{ref}: text is empty or not a string; fill it in or remove the row")
        return {"text": text}
    if shape == "alpaca":
        parts = [r.get("instruction"), r.get("input") or ""]
        if not all(isinstance(p, str) for p in parts) or not parts[0].strip():
            raise DataError(f"{ref}: instruction (and input, when given) must be text; fill it in")
        user = parts[0] + (f"\n\n{parts[1]}" if parts[1].strip() else "")
        messages = [{"role": "user", "content": user}]
        messages += _turns(r.get("output"), "assistant", ref, "output", csv)
        example: dict[str, Any] = {"messages": messages}
        start = 0
    elif shape == "preference":
        prompt = _turns(r.get("prompt"), "user", ref, "prompt", csv)
        example = {"prompt": prompt}
        for side in ("chosen", "rejected"):
            example[side] = _turns(r.get(side), "assistant", ref, side, csv)
            problem = conversation_problem(prompt + example[side], start=len(prompt))
            if problem:
                raise DataError(f"{ref}: prompt + {side}: {problem}")
        if example["chosen"] == example["rejected"]:
            raise DataError(f"{ref}: chosen equals rejected; a preference pair needs two different "
                            "answers: fix or remove the row")
        return example
    elif shape == "messages":
        example, start = {"messages": _turns(r.get("messages"), "", ref, "messages", csv)}, 0
    else:  # prompt-completion: the loss covers every assistant turn (of the prompt's too)
        prompt = _turns(r.get("prompt"), "user", ref, "prompt", csv)
        example = {"messages": prompt + _turns(r.get("completion"), "assistant", ref, "completion",
                                               csv)}
        start = len(prompt)
    problem = conversation_problem(example["messages"], start=start)
    if problem:
        raise DataError(f"{ref}: {problem}")
    return example


def _split(path: Path, examples: list[dict[str, Any]], given: list[str] | None, split: str,
           seed: int, fractions: tuple[float, float, float] | None) -> list[dict[str, Any]]:
    """The examples of ``split``: by the file's split column (``given``), else seeded, identical
    examples kept in one split."""
    if given is not None:
        if fractions is not None:
            raise DataError(
                f"{path} has a split column, which fixes the split: drop the split fractions"
            )
        given = ["val" if g in _VAL_NAMES else g for g in given]
        bad = sorted(set(given) - {"train", "val", "test"})
        if bad:
            raise DataError(
                f"{path}: split column has {bad}; use train, val (or validation/dev) or test"
            )
        chosen = [e for e, g in zip(examples, given) if g == split]
        if not chosen:
            raise DataError(
                f"{path} has no rows with split {split!r}; add some or drop the split column"
            )
        return chosen
    groups = [json.dumps(e, sort_keys=True) for e in examples]
    idx = stratified_split([0] * len(examples), seed, fractions or DEFAULT_FRACTIONS, groups)[split]
    if split == "train" and not idx:
        raise DataError(f"{path} leaves no example for training ({len(examples)} in all); add rows")
    return [examples[i] for i in idx]


def user_file(path: Path, split: str, seed: int, limit: int | None,
              fractions: tuple[float, float, float] | None = None,
              encoding: str | None = None) -> Dataset:
    """The user's CSV/JSON/JSONL/.txt file at ``path``: a classification file (``label`` column)
    through :func:`.user_files.user_text`, any other shape of the module docstring here."""
    check_split(split)
    if not path.is_file():
        raise DataError(f"{path} does not exist; check the path")
    if path.suffix.lower() == ".txt":
        return _txt(path, split, seed, limit, fractions, encoding)
    rows, columns = read_rows(path, encoding)
    try:
        shape = shape_of(columns)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    if not rows or "label" in columns:
        return user_text(path, split, seed, limit, fractions, encoding)  # reads the file again
    if shape is None:
        missing = "text" if "text" not in columns else "label"
        raise DataError(f"{path} has no {missing!r} column and matches no accepted shape "
                        f"(columns: {_shown(columns)}); accepted: {ACCEPTED}")
    csv = path.suffix.lower() == ".csv"
    examples = [_example(shape, r, _ref(path, where), csv) for where, r in rows]
    for col in GROUP_COLUMNS:  # kept for task streams, as for classification files
        if col in columns:
            for e, (_, r) in zip(examples, rows):
                e[col] = str(r.get(col) if r.get(col) is not None else "").strip()
    given = None
    if "split" in columns:
        given = [str(r.get("split") or "").strip().lower() for _, r in rows]
    chosen = _split(path, examples, given, split, seed, fractions)
    return Dataset(path.name, _TASK.get(shape, "chat"), take(chosen, limit, seed), [])


_PARAGRAPH = re.compile(r"\n[ \t]*\n")  # a blank line (spaces or tabs only) ends a paragraph


def _txt(path: Path, split: str, seed: int, limit: int | None,
         fractions: tuple[float, float, float] | None, encoding: str | None) -> Dataset:
    """A ``.txt`` file: one document, one ``{"text"}`` example per blank-line-separated paragraph
    (line breaks inside a paragraph kept), seeded split over paragraphs."""
    text = decode(path, encoding).replace("\r\n", "\n")
    paragraphs = [p.strip() for p in _PARAGRAPH.split(text) if p.strip()]
    if not paragraphs:
        raise DataError(f"{path} holds no text; write the document into it")
    chosen = _split(path, [{"text": p} for p in paragraphs], None, split, seed, fractions)
    return Dataset(path.name, "text", take(chosen, limit, seed), [])


# -- bundled chat and preference tasks -----------------------------------------------------------
#: an article's first characters shown: the topic is clear by then, and with the instruction and
#: SmolLM2's chat template every one of the 2,225 conversations fits the causal-LM default of 256
#: tokens (at most 250). 1,000 characters (about 290 tokens) made --max-length 256 cut the answer
#: off 98% of them, so training on the set was refused.
BBC_CHARS = 550

CHAT_SETS = {
    "tweet-sentiment-chat": "tweets as chat: instruction + tweet -> negative/neutral/positive; "
    "':airlines,nfl,apple,cars,other' selects domains",
    "tweet-sentiment-pref": "tweet-sentiment-chat as preference pairs (chosen: the right "
    "sentiment; rejected: a seeded random wrong one)",
    "bbc-news-chat": f"BBC News as chat: instruction + article (first {BBC_CHARS} characters) "
    "-> its topic",
    "bbc-news-pref": "bbc-news-chat as preference pairs (chosen: the right topic; rejected: a "
    "seeded random wrong one)",
}


def _tweet_prompt(text: str) -> str:
    return ("What is the sentiment of this tweet? Answer with one word: "
            f"{', '.join(SENTIMENTS[:-1])} or {SENTIMENTS[-1]}.\n\nTweet: {text}")


def _article(text: str) -> str:
    """The article's first :data:`BBC_CHARS` characters, cut at a space, ``[...]`` marking a cut."""
    if len(text) <= BBC_CHARS:
        return text
    head = text[:BBC_CHARS]
    return head[: head.rfind(" ")].rstrip() + " [...]" if " " in head else head + " [...]"


def bundled_chat(name: str, arg: str, split: str, seed: int, limit: int | None,
                 fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> Dataset:
    """A bundled chat (``*-chat``) or preference (``*-pref``) task: the classification set's split
    (same seed, fractions and limit, so the test split is exactly the classification test split),
    each example with its gold ``answer`` and class ``label``; label_names are the answers.

    The preference sets pair the right answer (chosen) with a wrong one (rejected) drawn at random
    among the other classes, seeded by ``seed`` and the example's text (the same in every split).
    """
    source, _, kind = name.rpartition("-")
    if source == "tweet-sentiment":
        base = tweet_sentiment(split, seed, limit, arg or None, fractions)
        ask = _tweet_prompt
    elif arg:
        raise DataError(f"{name} takes no ':' argument; use {name!r}")
    else:
        base = bbc_news(split, seed, limit, fractions)
        topics = base.label_names
        ask = lambda text: (  # noqa: E731
            "What is the topic of this BBC News article? Answer with one word: "
            f"{', '.join(topics[:-1])} or {topics[-1]}.\n\nArticle: {_article(text)}"
        )
    names = list(base.label_names)
    examples = []
    for e in base.examples:
        answer = names[e["label"]]
        prompt = [{"role": "user", "content": ask(e["text"])}]
        reply = [{"role": "assistant", "content": answer}]
        out: dict[str, Any] = {"messages": prompt + reply}
        if kind == "pref":
            rng = random.Random(f"{name}\0{seed}\0{e['text']}")  # str seeds hash deterministically
            wrong = rng.choice([n for n in names if n != answer])
            out = {"prompt": prompt, "chosen": reply,
                   "rejected": [{"role": "assistant", "content": wrong}]}
        out.update(answer=answer, label=e["label"])
        if "domain" in e:
            out["domain"] = e["domain"]
        examples.append(out)
    shown = name + (f":{arg}" if arg else "")
    return Dataset(shown, "preference" if kind == "pref" else "chat", examples, names)


__all__ = [
    "ACCEPTED", "BBC_CHARS", "CHAT_SETS", "bundled_chat", "conversation_problem", "shape_of",
    "user_file",
]
