"""Hostile inputs for tests/test_fuzz.py: valid files made by deltatune (or the format's own writer)
and then mutated — truncated, byte-flipped, fields retyped, huge/negative/NaN numbers, unicode,
empty, nested junk — plus the bookkeeping every fuzz case shares (case counts, one-line errors, no
files left).
"""

from __future__ import annotations

import copy
import json
import os
import struct
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from hypothesis import strategies as st

#: cases run and how they ended, per loader: {"loader": {"cases": n, "ok": n, "refused": n}}
COUNTS: dict[str, Counter] = {}


def user_error(exc: BaseException) -> bool:
    """A deltatune user error: a ValueError subclass defined by deltatune (a bare ValueError from a
    library, or one from deep inside, is a finding)."""
    return isinstance(exc, ValueError) and type(exc).__module__.startswith("deltatune.")


def run_case(loader: str, call: Callable[[], Any], check: Callable[[Any], None] | None = None,
             on_refusal: Callable[[], None] | None = None) -> Any:
    """Run one case: the call returns a result that passes ``check``, or raises a deltatune user
    error whose message is one line. Anything else propagates (hypothesis then shrinks and reports
    it)."""
    counts = COUNTS.setdefault(loader, Counter())
    counts["cases"] += 1
    try:
        result = call()
    except ValueError as exc:
        if not user_error(exc):
            raise
        message = str(exc)
        assert message.strip() and "\n" not in message.strip(), f"not one line: {message!r}"
        counts["refused"] += 1
        if on_refusal is not None:
            on_refusal()
        return None
    counts["ok"] += 1
    if check is not None:
        check(result)
    return result


def tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``roots`` with (size, mtime_ns): a snapshot to compare."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                try:
                    s = p.lstat()
                except OSError:
                    continue
                out[str(p)] = (
                    s.st_size if name in filenames else 0,
                    s.st_mtime_ns if name in filenames else 0,
                )
    return out


@contextmanager
def writes_nothing(*roots: Path):
    """Assert that the block adds, changes or removes no file under ``roots`` (and in the cwd)."""
    cwd = Path.cwd()
    before, cwd_before = tree(*roots), sorted(os.listdir(cwd))
    yield
    after = tree(*roots)
    assert after == before, f"files changed: {sorted(set(after) ^ set(before)) or 'contents'}"
    assert sorted(os.listdir(cwd)) == cwd_before, "files written to the current directory"


# -- values ----------------------------------------------------------------------------------------
HOSTILE_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 5),
    st.sampled_from([2**31, -(2**31), 2**63, -(2**63), 2**64, 10**30, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", " ", "nan", "NaN", "inf", "-1", "1e400", "\x00", "\u202e\u0301", "a" * 300,
                     "../..", "lora", "LORA", "float32", "1", "0.5"]),
    st.text(max_size=12),
)
HOSTILE_JSON = st.recursive(
    HOSTILE_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)


def _paths(obj: Any, prefix: tuple = ()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _at(obj: Any, path: tuple) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def mutate_json(data: st.DataObject, obj: Any) -> Any:
    """``obj`` with 1-3 edits at random places: a value replaced by junk, a key deleted or added, a
    value wrapped in a list, or retyped (number ↔ string)."""
    obj = copy.deepcopy(obj)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        path = data.draw(st.sampled_from(list(_paths(obj))), label="at")
        op = data.draw(st.sampled_from(["replace", "delete", "add", "wrap", "retype"]), label="op")
        if not path:
            if op == "replace":
                obj = data.draw(HOSTILE_JSON, label="root")
            elif op == "add" and isinstance(obj, dict):
                obj[data.draw(st.text(max_size=8))] = data.draw(HOSTILE_JSON)
            continue
        parent, key = _at(obj, path[:-1]), path[-1]
        value = parent[key]
        if op == "replace":
            parent[key] = data.draw(HOSTILE_JSON, label="value")
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(value, dict):
            value[data.draw(st.text(max_size=8), label="key")] = data.draw(
                HOSTILE_JSON, label="value"
            )
        elif op == "add" and isinstance(value, list):
            value.append(data.draw(HOSTILE_JSON, label="value"))
        elif op == "wrap":
            parent[key] = [value]
        elif op == "retype":
            if isinstance(value, str):
                parent[key] = data.draw(
                    st.sampled_from([0, -1, 1.5, float("nan"), None, True, [value], {}])
                )
            else:
                parent[key] = json.dumps(value) if value is not None else "null"
    return obj


def mutate_bytes(data: st.DataObject, raw: bytes) -> bytes:
    """``raw`` truncated, with bytes flipped, inserted, deleted or spliced; or emptied /
    replaced."""
    op = data.draw(
        st.sampled_from(["truncate", "flip", "insert", "delete", "splice", "empty", "random"]),
        label="byte op",
    )
    n = len(raw)
    pos = lambda: data.draw(st.integers(0, max(n - 1, 0)), label="pos")  # noqa: E731
    if op == "truncate":
        return raw[: pos()]
    if op == "flip":
        b = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 4))):
            if b:
                b[pos() % len(b)] ^= data.draw(st.integers(1, 255))
        return bytes(b)
    if op == "insert":
        i = pos()
        return raw[:i] + data.draw(st.binary(min_size=1, max_size=16)) + raw[i:]
    if op == "delete":
        i = pos()
        return raw[:i] + raw[i + data.draw(st.integers(1, 16)):]
    if op == "splice":
        i, j = pos(), pos()
        return raw[:i] + raw[j: j + data.draw(st.integers(1, 64))] + raw[i:]
    if op == "empty":
        return b""
    return data.draw(st.binary(max_size=64))


# -- safetensors -----------------------------------------------------------------------------------
def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8: 8 + n]), raw[8 + n:]


SAFETENSORS_DTYPES = [
    "F32",
    "F16",
    "BF16",
    "F64",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "U16",
    "U32",
    "U64",
    "BOOL",
    "F8_E4M3",
    "F8_E5M2",
    "C64",
    "F4",
    "X",
    "",
    "f32",
    "F32 ",
]
HOSTILE_DIMS = st.one_of(
    st.lists(st.integers(-2, 6), max_size=4),
    st.sampled_from(
        [
            [2**32, 2**32],
            [2**63],
            [2**64],
            [0, 2**60],
            [-1],
            [1.5],
            ["2"],
            [None],
            3,
            "2,2",
            None,
            {},
        ]
    ),
)


def mutate_safetensors(data: st.DataObject, raw: bytes) -> bytes:
    """A safetensors file with its header edited (dtype, shape, offsets, metadata, the length
    prefix) or its bytes mutated."""
    kind = data.draw(
        st.sampled_from(["field", "json", "length", "bytes"]), label="safetensors edit"
    )
    if kind == "bytes":
        return mutate_bytes(data, raw)
    header, body = split_safetensors(raw)
    if kind == "field":
        names = [k for k in header if k != "__metadata__"]
        name = data.draw(st.sampled_from(names), label="tensor")
        field = data.draw(
            st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "drop"]),
            label="field",
        )
        if field == "dtype":
            header[name]["dtype"] = data.draw(st.sampled_from(SAFETENSORS_DTYPES) | HOSTILE_SCALARS)
        elif field == "shape":
            header[name]["shape"] = data.draw(HOSTILE_DIMS)
        elif field == "data_offsets":
            a, b = header[name]["data_offsets"]
            header[name]["data_offsets"] = data.draw(
                st.sampled_from(
                    [
                        [b, a],
                        [a, a],
                        [a, b + 1],
                        [a - 1, b],
                        [0, len(body) + 8],
                        [a, 2**64],
                        [-1, b],
                        [a],
                        [a, b, b],
                        "x",
                    ]
                )
            )
        elif field == "__metadata__":
            header["__metadata__"] = data.draw(
                st.dictionaries(st.text(max_size=5), HOSTILE_SCALARS, max_size=3) | HOSTILE_JSON
            )
        else:
            del header[name]
    elif kind == "json":
        header = mutate_json(data, header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    length = data.draw(
        st.sampled_from(
            [len(text)] * 6
            + [0, 1, len(text) + 8, len(text) - 8, 2**63, 2**64 - 1, len(text) + len(body) + 1]
        ),
        label="length",
    )
    return struct.pack("<Q", length % 2**64) + text + body


# -- GGUF ------------------------------------------------------------------------------------------
def gguf_bytes(path: Path) -> bytes:
    """A small valid GGUF file written by the ``gguf`` package's own writer."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.context_length", 64)
    writer.add_string("general.name", "fuzz")
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b", "ü"])
    writer.add_array("tokenizer.ggml.scores", [0.0, 1.0, 2.0, 3.0])
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.add_tensor("output.weight", np.ones((2, 8), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def mutate_gguf(data: st.DataObject, raw: bytes) -> bytes:
    """A GGUF file with a count, a length, the version or any 8/4 aligned word overwritten by a
    hostile number, or its bytes mutated."""
    kind = data.draw(st.sampled_from(["word", "bytes"]), label="gguf edit")
    if kind == "bytes":
        return mutate_bytes(data, raw)
    b = bytearray(raw)
    at = data.draw(st.sampled_from([4, 8, 16]) | st.integers(0, len(raw) - 8), label="offset")
    value = data.draw(
        st.sampled_from([0, 1, 2, 3, 4, 7, 255, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]),
        label="word",
    )
    if at == 4 or data.draw(st.booleans(), label="u32"):
        b[at: at + 4] = struct.pack("<I", value % 2**32)
    else:
        b[at: at + 8] = struct.pack("<Q", value % 2**64)
    return bytes(b)
