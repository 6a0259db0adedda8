"""Fuzzing every loader and CLI option parser with hypothesis (issue #25).

Each property: the loader returns a well-formed result, or raises a deltatune user error (a
ValueError subclass defined by deltatune) whose message is one line — never another exception, never
a hang (hypothesis deadline), never a file written (inputs and the current directory are compared
before and after; a refused command leaves no --out behind). Inputs are valid files from deltatune's
own writers (or the format's) then mutated, see tests/fuzz_inputs.py.

`make test` runs the ``ci`` profile (a few dozen cases per loader); `make fuzz` runs ``fuzz``
(DELTATUNE_FUZZ=1: 1,000 per loader) and writes the cases per loader to DELTATUNE_FUZZ_REPORT.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import MLP, randomize
from fuzz_inputs import (
    COUNTS,
    HOSTILE_JSON,
    HOSTILE_SCALARS,
    gguf_bytes,
    mutate_bytes,
    mutate_gguf,
    mutate_json,
    mutate_safetensors,
    run_case,
    tree,
    writes_nothing,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import deltatune as dt
from deltatune.data import Dataset

pytestmark = pytest.mark.timeout(3 * 3600 if os.environ.get("DELTATUNE_FUZZ") else 600)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    report = os.environ.get("DELTATUNE_FUZZ_REPORT")
    if report:
        path = Path(report)
        old = json.loads(path.read_text()) if path.is_file() else {}
        old.update({k: dict(v) for k, v in COUNTS.items()})
        path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")


_ROOT = Path(tempfile.mkdtemp(prefix="deltatune-fuzz-"))


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    shutil.rmtree(_ROOT, ignore_errors=True)


def case_dir() -> Path:
    return Path(tempfile.mkdtemp(dir=_ROOT))


# -- CSV / JSONL / JSON data ---------------------------------------------------------------------
LABELS = st.one_of(
    st.sampled_from([0, 1, 2, "a", "b", "1.0", 1.0, "", " ", "nan", float("nan"), None, True]),
    HOSTILE_SCALARS,
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
TEXTS = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", "  ", "a,b", 'say "hi"', "x\ny", "\r\n", "\x00"]),
    HOSTILE_SCALARS,
)
RECORDS = st.lists(
    st.fixed_dictionaries(
        {"text": TEXTS, "label": LABELS},
        optional={
            "split": st.sampled_from(["train", "val", "test", "dev", "validation", "", "bogus"])
            | HOSTILE_SCALARS,
            "task": HOSTILE_SCALARS,
            "domain": st.text(max_size=5),
            "": st.text(max_size=3),
            "extra": HOSTILE_JSON,
        },
    ),
    max_size=14,
)


def _text_file(data, kind: str) -> bytes:
    records = data.draw(RECORDS, label="records")
    if kind == "csv":
        columns = sorted({k for r in records for k in r}) or ["text", "label"]
        if data.draw(st.booleans(), label="shuffle header"):
            columns = data.draw(st.permutations(columns))
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(columns)
        for r in records:
            writer.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
        text = buf.getvalue()
    elif kind == "jsonl":
        text = "\n".join(json.dumps(r) for r in records)
    else:
        text = json.dumps(records, indent=data.draw(st.sampled_from([None, 1])))
    encoding = data.draw(
        st.sampled_from(["utf-8"] * 6 + ["utf-8-sig", "latin-1", "utf-16"]), label="written as"
    )
    raw = text.encode(encoding, errors="replace")
    if data.draw(st.booleans(), label="mutate bytes"):
        raw = mutate_bytes(data, raw)
    return raw


def _check_text_dataset(split, limit):
    def check(ds):
        assert isinstance(ds, Dataset)
        assert ds.task == "text-classification" and len(set(ds.label_names)) == len(ds.label_names)
        for ex in ds.examples:
            assert isinstance(ex["text"], str) and ex["text"].strip()
            assert isinstance(ex["label"], int) and 0 <= ex["label"] < len(ds.label_names)
        if limit is not None:
            assert len(ds) <= limit
        if split == "train":
            assert len({ex["label"] for ex in ds.examples}) >= 2
    return check


@pytest.mark.parametrize("kind", ["csv", "jsonl", "json"])
@given(data=st.data())
def test_text_data_files(kind, data):
    from deltatune.data import load_data

    where = case_dir()
    path = where / f"data.{kind}"
    path.write_bytes(_text_file(data, kind))
    split = data.draw(st.sampled_from(["train", "val", "test"]), label="split")
    limit = data.draw(st.sampled_from([None, None, 1, 3, 0, -1, 10**9]), label="limit")
    fractions = data.draw(
        st.sampled_from(
            [
                None,
                None,
                (0.5, 0.25, 0.25),
                (0.8, 0.2, 0.0),
                (float("nan"), 0.5, 0.5),
                (1, 2, 3),
                ("a", "b", "c"),
                (0.5, 0.5),
            ]
        ),
        label="fractions",
    )
    encoding = data.draw(
        st.sampled_from(
            [
                None,
                None,
                "utf-8",
                "latin-1",
                "utf-16",
                "cp1252",
                "ascii",
                "rot13",
                "hex",
                "base64",
                "zlib",
                "idna",
                "punycode",
                "bogus",
                "",
            ]
        ),
        label="encoding",
    )
    with writes_nothing(where):
        run_case(
            f"data: {kind}",
            lambda: load_data(
                str(path),
                split,
                seed=data.draw(st.integers(-5, 2**40)),
                limit=limit,
                fractions=fractions,
                encoding=encoding,
            ),
            _check_text_dataset(split, limit),
        )
    shutil.rmtree(where, ignore_errors=True)


# -- image folders ---------------------------------------------------------------------------------
def _image_bytes(data) -> tuple[str, bytes]:
    from PIL import Image

    kind = data.draw(
        st.sampled_from(
            ["png", "png", "jpg", "gif", "bmp", "broken", "empty", "text", "truncated"]
        ),
        label="image kind",
    )
    if kind in ("broken", "empty", "text"):
        suffix = data.draw(st.sampled_from([".png", ".jpg", ".txt", ".PNG", ""]))
        raw = {
            "broken": b"\x89PNG\r\n\x1a\n" + bytes(range(40)),
            "empty": b"",
            "text": "ü,1\n".encode(),
        }[kind]
        return suffix, raw
    mode = data.draw(
        st.sampled_from(["L", "RGB", "RGBA", "P", "1", "LA", "I;16", "I", "CMYK", "F"]),
        label="mode",
    )
    size = (data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12)))
    fmt = {"png": "PNG", "truncated": "PNG", "jpg": "JPEG", "gif": "GIF", "bmp": "BMP"}[kind]
    im = Image.new(mode, size)
    buf = io.BytesIO()
    try:
        im.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):  # this mode cannot be written in this format
        im.convert("RGB").save(buf, format=fmt)
    raw = buf.getvalue()
    if kind == "truncated":
        raw = mutate_bytes(data, raw)
    return "." + ("png" if kind == "truncated" else kind), raw


CLASS_NAMES = st.text(
    st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=8,
).filter(lambda s: s not in (".", ".."))


@given(data=st.data())
def test_image_folders(data):
    from deltatune.data import load_data

    where = case_dir()
    root = where / "imgs"
    root.mkdir()
    for name in data.draw(st.lists(CLASS_NAMES, max_size=4, unique=True), label="classes"):
        (root / name).mkdir()
        for i in range(data.draw(st.integers(0, 4), label="files")):
            suffix, raw = _image_bytes(data)
            (root / name / f"{i}{suffix}").write_bytes(raw)
        if data.draw(st.integers(0, 9)) == 0:
            (root / name / "nested").mkdir()
    if data.draw(st.integers(0, 9)) == 0:
        (root / "stray.png").write_bytes(b"not a folder")
    split = data.draw(st.sampled_from(["train", "val", "test"]), label="split")
    limit = data.draw(st.sampled_from([None, None, 1, 2, 0]), label="limit")

    def check(ds):
        assert ds.task == "image-classification"
        for ex in ds.examples:
            img = ex["image"]
            assert img.dtype == torch.uint8 and img.dim() == 3 and img.shape[0] == 3
            assert 0 <= ex["label"] < len(ds.label_names)

    with writes_nothing(where), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_case("data: image folder", lambda: load_data(str(root), split, limit=limit), check)
    shutil.rmtree(where, ignore_errors=True)


# -- delta directories (delta.json, adapter_config.json) -------------------------------------------
_TEMPLATES: dict[str, Path] = {}


def _template(fmt: str, method: str) -> Path:
    key = f"{fmt}-{method}"
    if key not in _TEMPLATES:
        torch.manual_seed(0)
        model = MLP().eval()
        spec = {
            "lora": lambda: dt.LoRA(
                r=2, alpha=4, targets=["fc1", "fc2"], trainable_modules=["head"]
            ),
            "dora": lambda: dt.LoRA(r=2, targets=["fc1"], dora=True),
            "ia3": lambda: dt.IA3(targets=["fc1", "fc2"], feedforward=["fc2"]),
        }[method]()
        dt.attach(model, spec)
        randomize(model)
        _TEMPLATES[key] = dt.save_adapter(model, _ROOT / "templates" / key, format=fmt)
    return _TEMPLATES[key]


def _mutate_delta_dir(data, path: Path, fmt: str) -> None:
    config = path / ("delta.json" if fmt == "deltatune" else "adapter_config.json")
    tensors = path / ("delta.safetensors" if fmt == "deltatune" else "adapter_model.safetensors")
    target = data.draw(
        st.sampled_from(
            ["config"] * 5 + ["config bytes", "tensors", "tensors", "checksums", "delete"]
        ),
        label="what to damage",
    )
    if target == "config":
        config.write_text(json.dumps(mutate_json(data, json.loads(config.read_text()))))
    elif target == "config bytes":
        config.write_bytes(mutate_bytes(data, config.read_bytes()))
    elif target == "tensors":
        tensors.write_bytes(mutate_safetensors(data, tensors.read_bytes()))
    elif target == "checksums":
        side = path / "adapter_checksums.json"
        if side.exists():
            side.write_text(json.dumps(mutate_json(data, json.loads(side.read_text()))))
        else:
            config.write_text(json.dumps(mutate_json(data, json.loads(config.read_text()))))
    else:
        victim = data.draw(st.sampled_from(sorted(p.name for p in path.iterdir())))
        (path / victim).unlink()


def _delta_dir_case(data, fmt: str) -> None:
    method = data.draw(st.sampled_from(["lora", "dora", "ia3"]), label="method")
    where = case_dir()
    path = where / "adapter"
    shutil.copytree(_template(fmt, method), path)
    _mutate_delta_dir(data, path, fmt)
    torch.manual_seed(0)
    model = MLP().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    verify = data.draw(st.booleans(), label="verify")

    def loaded(name):
        assert name in dt.delta_names(model)
        assert model(torch.randn(2, 8)).shape == (2, 3)

    def unchanged():  # a refused load leaves the model as it was
        assert dt.delta_names(model) == []
        after = model.state_dict()
        assert after.keys() == before.keys() and all(
            torch.equal(after[k], before[k]) for k in before
        )

    with writes_nothing(where), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_case(
            f"delta dir: {fmt}",
            lambda: dt.load_adapter(model, path, verify=verify),
            loaded,
            unchanged,
        )
        run_case(
            f"adapter info: {fmt}",
            lambda: dt.read_adapter_info(path, verify=verify),
            _check_info(fmt),
        )
    shutil.rmtree(where, ignore_errors=True)


def _check_info(fmt: str):
    def check(info):
        assert isinstance(info, dict) and info["format"] == fmt
    return check


@given(data=st.data())
def test_delta_json(data):
    _delta_dir_case(data, "deltatune")


@given(data=st.data())
def test_peft_adapter_config(data):
    _delta_dir_case(data, "peft")


# -- safetensors headers ---------------------------------------------------------------------------
@given(data=st.data())
def test_safetensors_headers(data):
    from safetensors.torch import save

    from deltatune.io.checks import tensor_header
    from deltatune.io.files import load_tensors

    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(4, dtype=torch.float16),
        "c": torch.tensor([1, -2], dtype=torch.int64),
        "d": torch.tensor([True]),
        "e": torch.zeros(0, 2, dtype=torch.bfloat16),
    }
    raw = mutate_safetensors(data, save(tensors, metadata={"format": "pt"}))
    where = case_dir()
    path = where / "x.safetensors"
    path.write_bytes(raw)

    def check_tensors(out):
        assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in out.items())

    def check_header(out):
        assert all(isinstance(d, str) and all(isinstance(s, int) and s >= 0 for s in shape)
                   for d, shape in out.values())

    with writes_nothing(where):
        run_case("safetensors: load_tensors", lambda: load_tensors(path), check_tensors)
        run_case("safetensors: tensor_header", lambda: tensor_header(path), check_header)
    shutil.rmtree(where, ignore_errors=True)


# -- merge YAML ------------------------------------------------------------------------------------
_YAML_SNIPPETS = [
    "[" * 5000 + "]" * 5000,
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
    "merge_method: linear\nmodels: [*e]\n",
    "merge_method: linear\nmodels: &m [{model: m1.safetensors, parameters: {weight: *m}}]\n",
    "merge_method: !!python/object/apply:os.system [echo hi]\nmodels: [m1.safetensors]\n",
    "merge_method: linear\nmodels: !!set {m1.safetensors: null}\n",
    "merge_method: linear\nmodels: [!!binary aGVsbG8=]\n",
    "merge_method: linear\nmodels: [m1.safetensors]\nparameters: {weight: 2001-12-14}\n",
    "merge_method: linear\nmerge_method: ties\nmodels: [m1.safetensors]\n",
    "\ufeffmerge_method: linear\nmodels: [m1.safetensors]\n",
    "merge_method: linear\nmodels:\n\t- m1.safetensors\n",
    "---\nmerge_method: linear\n---\nmodels: []\n",
    "? [a, b]\n: c\nmerge_method: linear\nmodels: [m1.safetensors]\n",
    "merge_method: linear\n"
    "models: [{model: m1.safetensors, parameters: {weight: {value: {value: {value: 1}}}}}]\n",
]


def _merge_yaml(data) -> bytes:
    import yaml

    from deltatune.algebra.registry import merge_methods

    methods = merge_methods()
    method = data.draw(st.sampled_from(sorted(methods)) | HOSTILE_SCALARS, label="merge_method")
    known = sorted(set(methods[method].model_params) | set(methods[method].shared_params)) \
        if isinstance(method, str) and method in methods else []
    names = st.sampled_from(known + ["lambda", "bogus", ""]) | st.text(max_size=5)
    scalar_or_gradient = HOSTILE_SCALARS | st.lists(HOSTILE_SCALARS | st.floats(-2, 2), max_size=4)
    setting = st.one_of(
        scalar_or_gradient,
        st.floats(-2, 2),
        st.integers(0, 3),
        st.lists(
            st.fixed_dictionaries(
                {"value": scalar_or_gradient}, optional={"filter": HOSTILE_SCALARS}
            ),
            max_size=3,
        ),
        HOSTILE_JSON,
    )
    params = st.dictionaries(names, setting, max_size=3)
    refs = (
        st.sampled_from(
            [
                "m1.safetensors",
                "m2.safetensors",
                "base.safetensors",
                "missing.safetensors",
                "a+b",
                "dir",
            ]
        )
        | HOSTILE_SCALARS
    )
    entry = st.one_of(
        refs,
        st.fixed_dictionaries(
            {"model": refs},
            optional={"parameters": params | HOSTILE_JSON, "stats": refs, "junk": HOSTILE_SCALARS},
        ),
        HOSTILE_JSON,
    )
    doc = data.draw(
        st.fixed_dictionaries(
            {"merge_method": st.just(method), "models": st.lists(entry, max_size=4) | HOSTILE_JSON},
            optional={
                "base_model": refs,
                "parameters": params | HOSTILE_JSON,
                "random_seed": HOSTILE_SCALARS,
                "dtype": st.sampled_from(["float32", "bfloat16", "int8", "bogus"])
                | HOSTILE_SCALARS,
                "out_dtype": HOSTILE_SCALARS,
                "tokenizer_source": HOSTILE_SCALARS,
                "slices": HOSTILE_JSON,
                "name": HOSTILE_SCALARS,
            },
        ),
        label="config",
    )
    text = yaml.safe_dump(doc, allow_unicode=data.draw(st.booleans()))
    how = data.draw(st.sampled_from(["plain"] * 4 + ["bytes", "snippet"]), label="yaml form")
    if how == "snippet":
        return data.draw(st.sampled_from(_YAML_SNIPPETS)).encode()
    raw = text.encode()
    return mutate_bytes(data, raw) if how == "bytes" else raw


@given(data=st.data())
def test_merge_yaml(data):
    from safetensors.torch import save_file

    from deltatune.algebra.config import MergeConfig, load_merge_config

    where = case_dir()
    for name in ("m1", "m2", "base"):
        save_file({"w": torch.ones(2, 2)}, str(where / f"{name}.safetensors"))
    (where / "dir").mkdir()
    path = where / "merge.yaml"
    path.write_bytes(_merge_yaml(data))

    def check(config):
        assert isinstance(config, MergeConfig) and isinstance(config.method, str) and config.models
        assert all(isinstance(m.path, Path) for m in config.models)

    with writes_nothing(where), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_case("merge YAML", lambda: load_merge_config(path), check)
    shutil.rmtree(where, ignore_errors=True)


# -- GGUF ------------------------------------------------------------------------------------------
_GGUF: dict[str, bytes] = {}


@given(data=st.data())
def test_gguf(data):
    from deltatune.models.gguf import gguf_info

    if "raw" not in _GGUF:
        _GGUF["raw"] = gguf_bytes(_ROOT / "template.gguf")
    where = case_dir()
    path = where / "model.gguf"
    path.write_bytes(mutate_gguf(data, _GGUF["raw"]))

    def check(info):
        assert isinstance(info["architecture"], str)
        assert all(
            isinstance(n, str) and all(isinstance(d, int) for d in s)
            for n, (_, s) in info["tensors"].items()
        )

    with writes_nothing(where):
        run_case("GGUF", lambda: gguf_info(path), check)
    shutil.rmtree(where, ignore_errors=True)


# -- CLI option parsers ----------------------------------------------------------------------------
INT = [
    "-1",
    "0",
    "-0",
    "1",
    "2",
    "3",
    "2147483648",
    "9223372036854775808",
    "1" + "0" * 30,
    "nan",
    "inf",
    "1.5",
    "1e3",
    "",
    " ",
    "abc",
    "0x10",
    "\u0663",
    "+2",
    "1_0",
    "-9223372036854775809",
]
SMALL_INT = [
    "-1",
    "0",
    "-0",
    "1",
    "2",
    "nan",
    "1.5",
    "",
    "abc",
    "0x10",
    "\u0663",
    "+2",
    "-9223372036854775809",
]
FLOAT = [
    "nan",
    "-nan",
    "inf",
    "-inf",
    "1e309",
    "-1e309",
    "0",
    "-0.0",
    "1e-320",
    "-1",
    "0.5",
    "1",
    "2",
    "1e30",
    "abc",
    "",
    "1,5",
    "0x1p3",
    "\u0661",
    " 1",
]
JUNK = [
    "",
    " ",
    "bogus",
    "\u202e",
    "a" * 300,
    "..",
    "-",
    ",",
    ",,",
    "x=",
    "=",
    "a=b=c",
    "nan",
    "-1",
    "\u00fc",
    "--out",
]


def _inputs() -> dict[str, str]:
    """Small real inputs every job can use, made once: a 4-class image folder, a trained small-cnn
    adapter, feature/logit arrays, two tiny checkpoints and a merge config."""
    root = _ROOT / "inputs"
    if (root / "ready").exists():
        return json.loads((root / "ready").read_text())
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from deltatune.cli.app import main

    shutil.rmtree(root, ignore_errors=True)  # an earlier attempt that failed half-way
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for c in "abcd":
        (root / "imgs" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                root / "imgs" / c / f"{i}.png"
            )
    (root / "text.csv").write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(20)))
    assert (
        main(
            [
                "train",
                "--model",
                "small-cnn",
                "--data",
                str(root / "imgs"),
                "--max-steps",
                "1",
                "--limit",
                "8",
                "--batch-size",
                "4",
                "--out",
                str(root / "run"),
            ]
        )
        == 0
    )
    np.save(root / "ref.npy", rng.normal(size=(40, 4)).astype(np.float32))
    np.save(root / "tgt.npy", rng.normal(size=(30, 4)).astype(np.float32))
    np.save(root / "ref_labels.npy", rng.integers(0, 4, 40))
    np.save(root / "tgt_labels.npy", rng.integers(0, 4, 30))
    for name in ("m1", "m2", "base"):
        save_file({"w": torch.randn(4, 4), "b": torch.randn(4)}, str(root / f"{name}.safetensors"))
    (root / "merge.yaml").write_text(
        f"merge_method: ties\nbase_model: {root / 'base.safetensors'}\nmodels:\n"
        f"  - model: {root / 'm1.safetensors'}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"  - model: {root / 'm2.safetensors'}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
    )
    (root / "file.txt").write_text("not a directory")
    paths = {
        "imgs": str(root / "imgs"),
        "csv": str(root / "text.csv"),
        "adapter": str(root / "run" / "adapter"),
        "ref": str(root / "ref.npy"),
        "tgt": str(root / "tgt.npy"),
        "ref_labels": str(root / "ref_labels.npy"),
        "tgt_labels": str(root / "tgt_labels.npy"),
        "merge": str(root / "merge.yaml"),
        "file": str(root / "file.txt"),
        "m1": str(root / "m1.safetensors"),
        "root": str(root),
    }
    (root / "ready").write_text(json.dumps(paths))
    return paths


def _jobs(p: dict[str, str]) -> dict[str, tuple[list[str], dict[str, list[str]]]]:
    """Per job: a cheap valid command (without --out) and each option's hostile and valid values."""
    paths = [p["imgs"], p["adapter"], p["file"], "", ".", "missing/dir", "a" * 300, p["csv"]]
    return {
        "train": (
            [
                "train",
                "--model",
                "small-cnn",
                "--data",
                p["imgs"],
                "--max-steps",
                "1",
                "--limit",
                "8",
                "--batch-size",
                "4",
            ],
            {
                "--model": ["small-cnn", "minilm", "smollm2"] + JUNK,
                "--data": [p["imgs"], p["csv"], "digits"] + JUNK,
                "--method": ["lora", "ia3", "bottleneck", "vera", "oft", "bitfit", "prefix"] + JUNK,
                "--rank": INT,
                "--alpha": FLOAT,
                "--dropout": FLOAT,
                "--targets": ["conv1", "conv1,pw", "head", "bn"] + JUNK,
                "--opt": [
                    "dora=true",
                    "rslora=1",
                    "init=pissa",
                    "r=2",
                    "r=-1",
                    "alpha=nan",
                    "bogus=1",
                    "dora",
                ]
                + JUNK,
                "--epochs": INT,
                "--max-steps": INT,
                "--batch-size": INT,
                "--lr": FLOAT,
                "--grad-accum": SMALL_INT,
                "--schedule": ["linear", "cosine", "constant"] + JUNK,
                "--seed": INT,
                "--save-every": INT,
                "--class-weights": [
                    "balanced",
                    "1,2,3,4",
                    "1,2",
                    "nan,1,1,1",
                    "-1,1,1,1",
                    "0,0,0,0",
                    "inf,1,1,1",
                ]
                + JUNK,
                "--limit": INT,
                "--split-fractions": [
                    "0.7,0.1,0.2",
                    "1,0,0",
                    "0.5,0.5",
                    "nan,0.5,0.5",
                    "-0.1,0.6,0.5",
                ]
                + JUNK,
                "--encoding": ["utf-8", "latin-1", "rot13", "utf-16"] + JUNK,
                "--format": ["deltatune", "peft", "onnx"] + JUNK,
                "--config": ["CONFIG"],
                "--resume": ["FLAG"],
                "--overwrite": ["FLAG"],
            },
        ),
        "eval": (
            ["eval", "--adapter", p["adapter"], "--data", p["imgs"], "--limit", "8"],
            {
                "--adapter": paths,
                "--data": [p["imgs"], p["csv"], "mnist-c:fog:9", "digits-c:bogus:1"] + JUNK,
                "--model": ["small-cnn", "minilm"] + JUNK,
                "--split": ["train", "val", "test"] + JUNK,
                "--seed": INT,
                "--limit": INT,
                "--split-fractions": ["0.7,0.1,0.2", "0.5,0.5"] + JUNK,
                "--num-labels": INT,
                "--encoding": ["latin-1", "rot13"] + JUNK,
            },
        ),
        "export": (
            ["export", "--adapter", p["adapter"]],
            {"--adapter": paths, "--model": ["small-cnn", "minilm"] + JUNK},
        ),
        "merge": (
            ["merge", p["merge"]],
            {
                "CONFIG": [p["merge"], p["m1"], p["file"], p["imgs"], "missing.yaml", ""],
                "--shard-size": [
                    "5GB",
                    "1KB",
                    "500MB",
                    "0",
                    "-1",
                    "1XB",
                    "nan",
                    "1e400GB",
                    "0.5B",
                    "99999999999999999999999GB",
                ]
                + JUNK,
                "--seed": INT,
                "--threads": SMALL_INT + ["2147483648", "9223372036854775808"],
                "--quiet": ["FLAG"],
                "--overwrite": ["FLAG"],
            },
        ),
        "compress": (
            ["compress", p["adapter"], "--codec", "int8", "--min-numel", "10"],
            {
                "SOURCE": paths,
                "--codec": ["compeft", "bitdelta", "dare", "int8", "int4", "lowrank"] + JUNK,
                "--base": paths,
                "--density": FLOAT,
                "--rank": INT,
                "--scale": ["mean", "std"] + JUNK,
                "--alpha": FLOAT,
                "--seed": INT,
                "--values": ["float32", "float16", "bfloat16", "int8"] + JUNK,
                "--min-numel": INT,
                "--keep": ["classifier", "head", "conv1"] + JUNK,
                "--overwrite": ["FLAG"],
            },
        ),
        "info": (["info", p["adapter"]], {"PATH": paths, "--json": ["FLAG"]}),
        "detect": (
            ["detect", "--reference", p["ref"], "--target", p["tgt"], "--permutations", "20"],
            {
                "--reference": [p["ref"], p["tgt"], p["m1"], p["file"], p["imgs"]] + JUNK,
                "--target": [p["tgt"], p["ref_labels"], p["m1"], p["imgs"]] + JUNK,
                "--test": ["mmd", "ks", "classifier", "bbsd", "label"] + JUNK,
                "--alpha": FLOAT,
                "--model": ["small-cnn"] + JUNK,
                "--adapter": paths,
                "--layer": ["conv1", "head"] + JUNK,
                "--window": SMALL_INT + ["10"],
                "--key": ["w", "x"] + JUNK,
                "--permutations": SMALL_INT + ["10"],
                "--split": ["train", "test"] + JUNK,
                "--limit": INT,
                "--batch-size": INT,
                "--seed": INT,
                "--encoding": ["latin-1", "rot13"] + JUNK,
            },
        ),
        "estimate": (
            [
                "estimate",
                "--reference",
                p["ref"],
                "--reference-labels",
                p["ref_labels"],
                "--target",
                p["tgt"],
            ],
            {
                "--reference": [p["ref"], p["tgt"], p["m1"], p["imgs"]] + JUNK,
                "--target": [p["tgt"], p["ref"], p["m1"]] + JUNK,
                "--model": ["small-cnn"] + JUNK,
                "--adapter": paths,
                "--reference-labels": [p["ref_labels"], p["tgt_labels"], p["ref"], p["m1"]] + paths,
                "--target-labels": [p["tgt_labels"], p["ref_labels"], p["tgt"]] + paths,
                "--reference-split": ["val", "train"] + JUNK,
                "--split": ["test"] + JUNK,
                "--methods": ["confidence", "atc,doc", "cot", "confidence,confidence"] + JUNK,
                "--score": ["entropy", "confidence"] + JUNK,
                "--calibrate": ["FLAG"],
                "--no-calibrate": ["FLAG"],
                "--key": ["w"] + JUNK,
                "--limit": INT,
                "--batch-size": INT,
                "--seed": INT,
                "--encoding": ["rot13"] + JUNK,
            },
        ),
        "adapt": (
            [
                "adapt",
                "--model",
                "small-cnn",
                "--data",
                p["imgs"],
                "--limit",
                "8",
                "--batch-size",
                "4",
                "--no-compare",
            ],
            {
                "--model": ["small-cnn", "minilm"] + JUNK,
                "--data": [p["imgs"], p["csv"]] + JUNK,
                "--method": ["bn", "alpha_bn", "tent", "eata", "sar", "cotta", "lame", "em"] + JUNK,
                "--opt": [
                    "lr=1e-3",
                    "lr=nan",
                    "lr=-1",
                    "steps=2",
                    "bogus=1",
                    "alpha=2",
                    "momentum=inf",
                ]
                + JUNK,
                "--adapter": paths,
                "--split": ["train", "val", "test"] + JUNK,
                "--batch-size": INT,
                "--limit": INT,
                "--compare": ["FLAG"],
                "--seed": INT,
                "--encoding": ["rot13"] + JUNK,
            },
        ),
        "allocate": (
            [
                "allocate",
                "-m",
                "small-cnn",
                "-d",
                p["imgs"],
                "-b",
                "10%",
                "--batches",
                "1",
                "--batch-size",
                "4",
            ],
            {
                "-m": ["small-cnn"] + JUNK,
                "-d": [p["imgs"], p["csv"]] + JUNK,
                "-b": [
                    "0.5%",
                    "10%",
                    "100",
                    "0",
                    "-1",
                    "0%",
                    "200%",
                    "nan%",
                    "inf",
                    "1e400",
                    "%",
                    "1e3",
                ]
                + JUNK,
                "--method": ["sensitivity", "adalora"] + JUNK,
                "--targets": ["conv1", "head"] + JUNK,
                "--batches": SMALL_INT,
                "--batch-size": INT,
                "--seed": INT,
                "--steps": SMALL_INT,
            },
        ),
        "search": (
            [
                "search",
                "-m",
                "small-cnn",
                "-d",
                p["imgs"],
                "-b",
                "20%",
                "-n",
                "1",
                "--max-steps",
                "1",
                "--limit",
                "8",
                "--batch-size",
                "4",
            ],
            {
                "-b": ["0.5%", "20%", "100", "0", "-1", "200%", "nan%", "inf"] + JUNK,
                "-n": SMALL_INT,
                "--max-steps": SMALL_INT,
                "--limit": INT,
                "--methods": ["lora", "ia3,bottleneck", "adalora"] + JUNK,
                "--positions": ["qv", "attn", "ffn", "all"] + JUNK,
                "--targets": ["conv1"] + JUNK,
                "--batch-size": INT,
                "--seed": INT,
                "--backend": ["optuna"] + JUNK,
                "--workers": SMALL_INT,
                "--resume": ["FLAG"],
            },
        ),
        "continual": (
            [
                "continual",
                "-m",
                "small-cnn",
                "-s",
                f"{p['imgs']}@0,1;2,3",
                "--max-steps",
                "1",
                "--limit",
                "16",
                "--limit-test",
                "8",
                "--batch-size",
                "4",
            ],
            {
                "-s": [
                    f"{p['imgs']}@0,1;2,3",
                    f"{p['imgs']}@0,1;1,2",
                    f"{p['imgs']}@0,9",
                    f"{p['imgs']}@task",
                    f"{p['imgs']}@",
                    f"{p['imgs']}@;",
                    p["imgs"],
                    "split-bogus",
                ]
                + JUNK,
                "--strategy": [
                    "sequential",
                    "joint",
                    "replay",
                    "ewc",
                    "lwf",
                    "lae",
                    "merge",
                    "olora",
                ]
                + JUNK,
                "--method": ["lora", "full", "ia3"] + JUNK,
                "--rank": INT,
                "--epochs": SMALL_INT,
                "--max-steps": SMALL_INT,
                "--batch-size": INT,
                "--lr": FLOAT,
                "--limit": INT,
                "--limit-test": INT,
                "--task-ids": ["FLAG"],
                "--buffer-size": INT,
                "--lam": FLOAT,
                "--opt": ["momentum=0.99", "momentum=nan", "bogus=1"] + JUNK,
                "--seed": INT,
            },
        ),
        # demo trains MiniLM for minutes when its options are valid: only values it must refuse
        "demo": (
            ["demo", "--limit", "8"],
            {
                "--epochs": ["-1", "0", "nan", "abc", "", "1.5", "-9223372036854775809"],
                "--limit": ["-1", "0", "nan", "abc", "", "1.5"],
            },
        ),
    }


_OUTS = ["fresh"] * 6 + ["existing file", "input", "inside input", "cwd", "empty", "long", "nested"]


def _config_yaml(data) -> bytes:
    import yaml

    keys = st.sampled_from(
        [
            "model",
            "data",
            "method",
            "seed",
            "limit",
            "split_fractions",
            "encoding",
            "method_options",
            "train",
            "max_steps",
            "bogus",
            "",
        ]
    )
    doc = data.draw(
        st.dictionaries(keys, HOSTILE_JSON, max_size=4) | HOSTILE_JSON, label="--config"
    )
    raw = yaml.safe_dump(doc).encode()
    return mutate_bytes(data, raw) if data.draw(st.booleans(), label="mutate config") else raw


def _cli_case(job: str, data) -> None:
    import contextlib

    from deltatune.cli.app import main

    p = _inputs()
    base, options = _jobs(p)[job]
    where = case_dir()
    argv = list(base)
    out = where / "out"
    fresh_out = True
    for _ in range(data.draw(st.integers(1, 2), label="options edited")):
        extra = (
            []
            if job == "demo"
            else ["unknown", "drop"]
            if job in ("info", "allocate")
            else ["--out", "unknown", "drop"]
        )
        name = data.draw(st.sampled_from(sorted(options) + extra), label="option")
        if name == "unknown":
            argv += [data.draw(st.sampled_from(["--bogus", "--Out", "-x", "--", "--out="])), "1"]
            continue
        if name == "drop":
            flags = [i for i, a in enumerate(argv) if a.startswith("-")]
            if flags:
                i = data.draw(st.sampled_from(flags))
                del argv[i: i + 2]
            continue
        if name == "--out":
            kind = data.draw(st.sampled_from(_OUTS), label="--out")
            out = {
                "fresh": where / "out",
                "existing file": Path(p["file"]),
                "input": Path(p["imgs"]),
                "inside input": Path(p["imgs"]) / "a" / "new",
                "cwd": where,
                "empty": Path(""),
                "long": where / ("o" * 300),
                "nested": where / "a" / "ü b" / "c",
            }[kind]
            fresh_out = kind in ("fresh", "nested")
            continue
        value = data.draw(st.sampled_from(options[name]), label=name)
        if value == "FLAG":
            argv.append(name)
        elif value == "CONFIG":
            (where / "config.yaml").write_bytes(_config_yaml(data))
            argv += [name, str(where / "config.yaml")]
        elif name in ("CONFIG", "SOURCE", "PATH"):
            argv[1] = value
        else:
            argv += [name, value]
    if job not in ("info", "allocate"):
        argv += ["--out" if job != "compress" and job != "merge" else "-o", str(out)]
    inputs = Path(p["root"])
    before_inputs, before = tree(inputs), tree(where)
    cwd = os.getcwd()
    sink = io.StringIO()
    os.chdir(where)
    try:
        with (
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            rc = main(argv)  # any exception other than typer's exits escapes main: a traceback
    finally:
        os.chdir(cwd)
    counts = COUNTS.setdefault(f"cli: {job}", Counter())
    counts["cases"] += 1
    counts["ok" if rc == 0 else "refused"] += 1
    assert isinstance(rc, int) and rc in (0, 1, 2), (argv, rc, sink.getvalue()[-2000:])
    assert "Traceback" not in sink.getvalue(), sink.getvalue()[-2000:]
    if rc == 0 and argv[-2] in ("--out", "-o") and out.is_relative_to(Path(p["imgs"]) / "a") \
            and not any(p["imgs"] in a for a in argv[:-1]):
        shutil.rmtree(out)  # an output put among the files of inputs this job does not read is fine
    assert tree(inputs) == before_inputs, f"inputs changed by {argv}"
    if rc != 0:
        assert tree(where) == before, (
            f"refused command {argv} left {sorted(set(tree(where)) - set(before))}"
        )
        if fresh_out:
            assert not out.exists()
    shutil.rmtree(where, ignore_errors=True)


# one of the user errors the CLI turns into a line
from deltatune.cli.common import CLIError  # noqa: E402

assert issubclass(CLIError, ValueError)
CLI_JOBS = [
    "train",
    "eval",
    "export",
    "merge",
    "compress",
    "info",
    "detect",
    "estimate",
    "adapt",
    "allocate",
    "search",
    "continual",
    "demo",
]


@pytest.mark.parametrize("job", CLI_JOBS)
@settings(deadline=120_000, max_examples=max(3, settings.default.max_examples // 10))
@given(data=st.data())
def test_cli_options(job, data):
    _cli_case(job, data)


@pytest.mark.parametrize(
    "key, item_type, value",
    [
        # a byte array's count: the reader built views past the end until killed (CI, 2026-12-06)
        (b"tokenizer.ggml.scores", 0, 2**40),
        (b"tokenizer.ggml.tokens", None, 2**33),  # a string array's count
        (b"general.name", None, 2**62),  # a string's length
    ],
)
def test_gguf_lengths_past_the_end_are_refused_at_once(tmp_path, key, item_type, value):
    """The gguf reader slices past the end of the file without an error, so a huge count made it
    allocate until the process was killed; the layout check refuses it first."""
    import time

    from deltatune.models.entry import ModelError
    from deltatune.models.gguf import gguf_info

    raw = bytearray(gguf_bytes(tmp_path / "template.gguf"))
    at = raw.index(key) + len(key) + 4  # past the key and its value type
    if raw[at - 4] == 9:  # an array: its item type, then its count
        if item_type is not None:
            raw[at : at + 4] = item_type.to_bytes(4, "little")
        at += 4
    raw[at : at + 8] = value.to_bytes(8, "little")
    path = tmp_path / "model.gguf"
    path.write_bytes(bytes(raw))
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="past the end of the file"):
        gguf_info(path)
    assert time.perf_counter() - t0 < 5
