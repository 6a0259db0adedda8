"""The user's own text-classification files: CSV (header row), JSONL (one object a line) or JSON
(an array of objects), each row with ``text`` and ``label``.

Every problem is one :class:`DataError` naming the file and the line (or row): files are decoded
strictly (UTF-8 by default; ``encoding`` for others, never with replacement characters), ragged CSV
rows, duplicated columns or keys, missing or NaN labels, labels of mixed JSON types and non-string
texts are refused rather than guessed at. Numeric labels are normalised, so ``1``, ``1.0`` and
``"1.0"`` are one class.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from .base import (
    DEFAULT_FRACTIONS,
    DataError,
    Dataset,
    check_split,
    require_classes,
    stratified_split,
    take,
)

GROUP_COLUMNS = ("task", "domain")  # a user file's columns kept per example, for task streams
_VAL_NAMES = {"val", "valid", "validation", "dev"}
_INTEGRAL = re.compile(r"[+-]?\d+\.0*")  # "3.0": a float column written by pandas, the integer 3

Row = tuple[str, dict[str, Any]]  # (where: "line 7" or "record 3", the row's fields)


def _shown(columns: list[str]) -> str:
    """Column names for a one-line message (control characters escaped)."""
    return ", ".join(c if c.isprintable() else repr(c) for c in columns) or "none"


def decode(path: Path, encoding: str | None = None) -> str:
    """The file's text, decoded strictly (UTF-8 unless ``encoding``), a leading byte-order mark
    dropped."""
    name = encoding or "utf-8"
    try:
        info = codecs.lookup(name)
    except LookupError:
        raise DataError(
            f"unknown encoding {name!r} for {path}; use e.g. utf-8, latin-1 or cp1252"
        ) from None
    if not getattr(
        info, "_is_text_encoding", True
    ):  # rot13, hex, base64, zlib: bytes/str transforms
        raise DataError(
            f"{name!r} is not a text encoding (read {path}); use e.g. utf-8, latin-1 or cp1252"
        )
    codec = info.name
    data = path.read_bytes()
    if encoding is None and b"\x00" in data:
        at = data.index(b"\x00")
        raise DataError(
            f"{path} holds a NUL byte at offset {at}: a binary file or UTF-16 text, not a UTF-8 "
            "CSV/JSONL file; save it as UTF-8 (or pass --encoding utf-16)"
        )
    try:
        # utf-8-sig: spreadsheet exports start with a byte-order mark that would rename the first
        # column
        return data.decode("utf-8-sig" if codec == "utf-8" else codec)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path} is not valid {name} text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
            f"(line {line}); pass --encoding latin-1 (or the file's own encoding)"
        ) from None
    except (
        UnicodeError
    ) as exc:  # codecs such as idna/punycode raise the base class, without a position
        raise DataError(
            f"{path} is not valid {name} text ({' '.join(str(exc).split())}); "
            "pass --encoding latin-1 (or the file's own encoding)"
        ) from None


def _csv_rows(path: Path, text: str) -> tuple[list[Row], list[str]]:
    old = csv.field_size_limit()
    # the default limit (128 KiB) rejects long documents; no field can be longer than the file
    csv.field_size_limit(max(old, len(text) + 1))
    try:
        reader = csv.reader(
            io.StringIO(text, newline="")
        )  # newline="": CRLF and quoted newlines intact
        header = [h.strip() for h in next(reader, [])]
        seen: set[str] = set()
        for h in header:
            if h and h in seen:
                raise DataError(
                    f"{path}: column {h!r} appears more than once in the header; rename or drop one"
                )
            seen.add(h)
        rows: list[Row] = []
        end = reader.line_num
        for fields in reader:
            start, end = end + 1, reader.line_num  # a quoted field may span lines: report the first
            if not any(f.strip() for f in fields):
                continue  # blank lines (and ",,," lines from spreadsheets)
            if len(fields) != len(header):
                hint = ("a quote opened there may be unclosed" if any("\n" in f for f in fields)
                        else "quote fields that contain commas")
                raise DataError(
                    f"{path}: line {start} has {len(fields)} fields but the header has "
                    f"{len(header)} ({_shown(header)}); {hint}"
                )
            rows.append((f"line {start}", dict(zip(header, fields))))
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num} is not valid CSV ({exc})") from None
    finally:
        csv.field_size_limit(old)
    return rows, header


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _json_rows(path: Path, text: str) -> tuple[list[Row], list[str]]:
    loads = lambda s: json.loads(s, object_pairs_hook=_no_duplicates)  # noqa: E731
    numbered: list[tuple[str, Any]] = []
    whole = None
    if path.suffix.lower() == ".json" and text.strip():
        try:
            whole = loads(text)
        except json.JSONDecodeError as exc:
            if text.lstrip().startswith(("[", "{")) and "\n{" not in text:
                raise DataError(
                    f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix the file"
                ) from None
        except _DuplicateKey as exc:
            raise DataError(
                f"{path}: key {exc.args[0]!r} appears twice in one object; keep one"
            ) from None
    if whole is not None:
        if not isinstance(whole, list):
            kind = {dict: "object", str: "string", bool: "boolean"}.get(type(whole), "number")
            raise DataError(f"{path} holds a JSON {kind}, not a list of records; write "
                            '[{"text": ..., "label": ...}, ...] or one object per line (JSONL)')
        numbered = [(f"record {n}", row) for n, row in enumerate(whole, 1)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((f"line {n}", loads(line)))
                except json.JSONDecodeError:
                    raise DataError(
                        f"{path}:{n} is not valid JSON; JSONL needs one object per line"
                    ) from None
                except _DuplicateKey as exc:
                    raise DataError(
                        f"{path}: line {n} has the key {exc.args[0]!r} twice; keep one"
                    ) from None
    for where, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"{path}: {where} is not a JSON object; "
                            'write one {"text": ..., "label": ...} per line')
    return numbered, sorted({k for _, r in numbered for k in r})


def read_rows(path: Path, encoding: str | None = None) -> tuple[list[Row], list[str]]:
    """Rows (each with where it is in the file) and column names of a CSV, JSONL or JSON file."""
    text = decode(path, encoding)
    return _csv_rows(path, text) if path.suffix.lower() == ".csv" else _json_rows(path, text)


def label_key(value: Any) -> str | None:
    """A label as its class name; ``None`` when missing (empty, null, NaN)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        # integral floats below 2**53 are exact integers ("1.0" is class "1"); larger ones stay
        # floats
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    if isinstance(value, str):
        s = value.strip()
        if not s or s.lower() == "nan":
            return None
        return str(int(s.split(".")[0])) if _INTEGRAL.fullmatch(s) else s
    raise TypeError(type(value).__name__)


def _json_kind(value: Any) -> str:
    return (
        "boolean"
        if isinstance(value, bool)
        else "number"
        if isinstance(value, (int, float))
        else "string"
    )


def label_order(values: set[str]) -> list[str]:
    """Label names sorted; all-numeric labels numerically (so "10" follows "9")."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def _labelled(path: Path, rows: list[Row], typed: bool) -> tuple[list[str], list[str]]:
    """Texts and class names per row; refuses missing texts or labels, dicts and mixed JSON
    types."""
    texts, keys, missing, kinds = [], [], [], {}
    for n, (where, r) in enumerate(rows, 1):
        text, label = r.get("text"), r.get("label")
        if not isinstance(text, str):
            what = (
                "no text" if text is None else f"a {type(text).__name__} as its text, not a string"
            )
            raise DataError(f"{path}: row {n} ({where}) has {what}; fill it in or remove the row")
        if not text.strip():
            raise DataError(
                f"{path}: row {n} ({where}) has an empty text; fill it in or remove the row"
            )
        try:
            key = label_key(label)
        except TypeError as exc:
            raise DataError(f"{path}: row {n} ({where}) has a {exc.args[0]} as its label; "
                            "labels are strings or numbers") from None
        if key is None:
            missing.append((n, where))
        elif typed:
            kinds.setdefault(_json_kind(label), (where, label))
        texts.append(text)
        keys.append(key)
    if missing:
        n, where = missing[0]
        raise DataError(
            f"{path}: row {n} lacks a label value ({where}; {len(missing)} row(s) in all); "
            "fill them in or remove those rows"
        )
    if len(kinds) > 1:
        shown = ", ".join(f"{k} {v!r} on {w}" for k, (w, v) in kinds.items())
        raise DataError(
            f"{path}: the labels mix JSON types ({shown}); write every label as the same type"
        )
    return texts, keys  # type: ignore[return-value]


def user_text(
    path: Path,
    split: str,
    seed: int,
    limit: int | None,
    fractions: tuple[float, float, float] | None = None,
    encoding: str | None = None,
) -> Dataset:
    """A CSV/JSONL file with ``text`` and ``label`` columns; an optional ``split`` column
    (train/val/test, val also as validation/valid/dev) fixes the split, else a seeded 80/10/10 one.
    Optional ``task`` / ``domain`` columns are kept in each example (continual task streams)."""
    check_split(split)
    if not path.is_file():
        raise DataError(f"{path} does not exist; check the path")
    rows, columns = read_rows(path, encoding)
    if not rows:
        raise DataError(f"{path} holds no rows; it needs a header and one row per example")
    for col in ("text", "label"):
        if col not in columns:
            raise DataError(f"{path} has no {col!r} column (columns: {_shown(columns)}); add one")
    texts, keys = _labelled(path, rows, typed=path.suffix.lower() != ".csv")
    names = label_order(set(keys))
    index = {name: i for i, name in enumerate(names)}
    examples: list[dict[str, Any]] = [{"text": t, "label": index[k]} for t, k in zip(texts, keys)]
    for col in GROUP_COLUMNS:  # kept for task streams (deltatune.continual: PATH@task)
        if col in columns:
            for e, (_, r) in zip(examples, rows):
                e[col] = str(r.get(col) if r.get(col) is not None else "").strip()
    if "split" in columns and fractions is not None:
        raise DataError(
            f"{path} has a split column, which fixes the split: drop the split fractions"
        )
    if "split" in columns:
        given = [str(r.get("split") or "").strip().lower() for _, r in rows]
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
    else:
        idx = stratified_split(
            [e["label"] for e in examples], seed, fractions or DEFAULT_FRACTIONS, groups=texts
        )[split]
        chosen = [examples[i] for i in idx]
    require_classes(str(path), split, [e["label"] for e in chosen], names)
    return Dataset(path.name, "text-classification", take(chosen, limit, seed), names)
