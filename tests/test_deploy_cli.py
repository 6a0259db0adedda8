"""`deltatune detect` / `deltatune adapt` on feature files: results.json, PNG, one-line errors."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from deltatune.cli.app import main

pytest.importorskip("scipy")
pytest.importorskip("matplotlib")


@pytest.fixture
def features(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(150, 4)).astype(np.float32)
    same = rng.normal(size=(150, 4)).astype(np.float32)
    moved = np.concatenate([rng.normal(size=(150, 4)), rng.normal(size=(150, 4)) + 1.0]).astype(
        np.float32
    )
    np.save(tmp_path / "ref.npy", ref)
    np.save(tmp_path / "same.npy", same)
    save_file({"feats": moved, "other": moved[:, :2].copy()}, str(tmp_path / "moved.safetensors"))
    return tmp_path


def test_detect_writes_results_and_png(features, capsys):
    out = features / "run"
    code = main(
        [
            "detect",
            "--reference",
            str(features / "ref.npy"),
            "--target",
            str(features / "same.npy"),
            "--permutations",
            "200",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert (
        res["job"] == "detect"
        and res["test"] == "mmd"
        and not res["drift"]
        and res["p_value"] > 0.05
    )
    assert res["n_reference"] == 150 and res["features"] == 4
    assert (out / "detect.png").read_bytes()[:4] == b"\x89PNG"
    assert "no drift" in capsys.readouterr().err


def test_detect_streams_windows(features):
    out = features / "stream"
    code = main(
        [
            "detect",
            "--reference",
            str(features / "ref.npy"),
            "--target",
            str(features / "moved.safetensors"),
            "--key",
            "feats",
            "--window",
            "100",
            "--test",
            "ks",
            "--batch-size",
            "50",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["windows"] == 3 and [h["drift"] for h in res["history"]][-1] is True
    assert (out / "p_values.png").is_file()


def test_detect_bad_input_is_one_line(features, capsys):
    args = ["detect", "--reference", str(features / "ref.npy"), "--out", str(features / "x")]
    assert main(args + ["--target", str(features / "moved.safetensors")]) == 2
    assert "holds 2 tensors (feats, other); pick one with --key" in capsys.readouterr().err
    assert main(args + ["--target", str(features / "missing.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "detect",
                "--reference",
                str(features / "ref.npy"),
                "--target",
                "mnist",
                "--out",
                str(features / "y"),
            ]
        )
        == 2
    )
    assert "both be feature files" in capsys.readouterr().err
    (features / "x").mkdir(exist_ok=True)
    (features / "x" / "keep").write_text("1")
    assert main(args + ["--target", str(features / "same.npy")]) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def digits_available():
    pytest.importorskip("corrupt_tta")
    pytest.importorskip("mnist")


def test_detect_with_a_model_on_real_datasets(tmp_path, digits_available):
    out = tmp_path / "det"
    code = main(
        [
            "detect",
            "--model",
            "small-cnn",
            "--reference",
            "mnist",
            "--target",
            "mnist-c:brightness:3",
            "--limit",
            "128",
            "--test",
            "bbsd",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert (
        res["n_reference"] == res["n_target"] == 128 and res["features"] == 10
    )  # softmax outputs of 10 classes
    assert res["drift"] and (out / "detect.png").is_file()


def test_adapt_streams_a_real_dataset_and_reports_errors(tmp_path, digits_available):
    import torch

    from deltatune.data import load_data
    from deltatune.models import load_model

    out = tmp_path / "tta"
    code = main(
        [
            "adapt",
            "--model",
            "small-cnn",
            "--data",
            "mnist-c:fog:3",
            "--method",
            "tent",
            "--opt",
            "lr=0.01",
            "--limit",
            "96",
            "--batch-size",
            "32",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert (
        res["batches"] == 3
        and len(res["curves"]["adapted"]) == 3
        and res["options"] == {"lr": 0.01}
    )
    assert 0 <= res["error"] <= 100 and (out / "adapt.png").read_bytes()[:4] == b"\x89PNG"
    # the unadapted pass is the plain model on the same batches (the job builds small-cnn after
    # seeding 0)
    torch.manual_seed(0)
    entry = load_model("small-cnn")
    batch = entry.collate(load_data("mnist-c:fog:3", "test", limit=96).examples)
    with torch.no_grad():
        wrong = int((entry.model.eval()(batch["pixel_values"]).argmax(-1) != batch["labels"]).sum())
    assert res["source_error"] == pytest.approx(100 * wrong / 96)
    assert (
        main(
            [
                "adapt",
                "--model",
                "small-cnn",
                "--data",
                "mnist",
                "--method",
                "tnet",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )


@pytest.fixture
def logits(tmp_path):
    """Reference logits of a calibrated 5-class model with their labels, and a target the model maps
    to class 0 with confidence ~1 (true accuracy 20%)."""
    import torch

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3000, 5, generator=g) * 3
    y = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(-1)
    collapsed = torch.randn(1000, 5, generator=g)
    collapsed[:, 0] += 12
    np.save(tmp_path / "ref.npy", z.numpy())
    np.save(tmp_path / "ref_labels.npy", y.numpy())
    np.save(tmp_path / "tgt.npy", collapsed.numpy())
    np.save(tmp_path / "tgt_labels.npy", (np.arange(1000) % 5).astype(np.int64))
    return tmp_path


def test_estimate_on_logit_files(logits, capsys):
    pytest.importorskip("ot")
    out = logits / "est"
    code = main(
        [
            "estimate",
            "--reference",
            str(logits / "ref.npy"),
            "--reference-labels",
            str(logits / "ref_labels.npy"),
            "--target",
            str(logits / "tgt.npy"),
            "--target-labels",
            str(logits / "tgt_labels.npy"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert (
        res["job"] == "estimate"
        and res["n_reference"] == 3000
        and res["n_target"] == 1000
        and res["classes"] == 5
    )
    est = res["estimated_accuracy"]
    assert set(est) == {"confidence", "atc", "doc", "cot"} and res[
        "true_accuracy"
    ] == pytest.approx(20.0)
    assert est["atc"] > 95 and abs(est["cot"] - 20.0) < 2  # the collapse fools ATC, not COT
    assert res["estimator"]["temperature"] == pytest.approx(1.0, rel=0.1)
    assert (out / "estimate.png").read_bytes()[:4] == b"\x89PNG"
    err = capsys.readouterr().err
    assert "estimated accuracy on" in err and "true 20.0%" in err
    # only the estimates asked for; no target labels -> no true accuracy
    out2 = logits / "est2"
    assert (
        main(
            [
                "estimate",
                "--reference",
                str(logits / "ref.npy"),
                "--reference-labels",
                str(logits / "ref_labels.npy"),
                "--target",
                str(logits / "tgt.npy"),
                "--methods",
                "atc,doc",
                "--score",
                "confidence",
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    res2 = json.loads((out2 / "results.json").read_text())
    assert set(res2["estimated_accuracy"]) == {"atc", "doc"} and res2["true_accuracy"] is None
    assert res2["estimator"]["score"] == "confidence"


def test_estimate_bad_input_is_one_line_and_writes_nothing(logits, capsys):
    base = ["estimate", "--reference", str(logits / "ref.npy"), "--target", str(logits / "tgt.npy")]
    cases = [
        (base + ["--out", str(logits / "a")], "need --reference-labels"),
        (
            base
            + ["--reference-labels", str(logits / "tgt_labels.npy"), "--out", str(logits / "b")],
            "holds 1000 labels for 3000 reference samples",
        ),
        (
            base
            + [
                "--reference-labels",
                str(logits / "ref_labels.npy"),
                "--methods",
                "atc,coat",
                "--out",
                str(logits / "c"),
            ],
            "unknown estimate 'coat' in --methods; choose from confidence, atc, doc, cot",
        ),
        (
            base
            + [
                "--reference-labels",
                str(logits / "ref_labels.npy"),
                "--score",
                "margin",
                "--out",
                str(logits / "d"),
            ],
            "--score must be entropy or confidence",
        ),
        (
            [
                "estimate",
                "--reference",
                str(logits / "ref.npy"),
                "--target",
                "mnist",
                "--out",
                str(logits / "e"),
            ],
            "both be logit files",
        ),
        (
            [
                "estimate",
                "--reference",
                "mnist",
                "--target",
                "mnist-c:contrast:3",
                "--out",
                str(logits / "f"),
            ],
            "datasets need --model",
        ),
        (
            base + ["--reference-labels", str(logits / "ref.npy"), "--out", str(logits / "g")],
            "must be class indices",
        ),
    ]
    np.save(logits / "three.npy", np.zeros((10, 3), dtype=np.float32))
    cases.append(
        (
            [
                "estimate",
                "--reference",
                str(logits / "ref.npy"),
                "--reference-labels",
                str(logits / "ref_labels.npy"),
                "--target",
                str(logits / "three.npy"),
                "--out",
                str(logits / "h"),
            ],
            "with the same classes",
        )
    )
    for args, message in cases:
        assert main(args) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (message, err)
        assert not (logits / args[-1]).exists(), message  # nothing written


def test_estimate_with_a_model_on_real_datasets(tmp_path, digits_available):
    pytest.importorskip("ot")
    out = tmp_path / "est"
    code = main(
        [
            "estimate",
            "--model",
            "small-cnn",
            "--reference",
            "mnist",
            "--target",
            "mnist-c:contrast:3",
            "--limit",
            "128",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert (
        res["n_reference"] == res["n_target"] == 128
        and res["classes"] == 10
        and res["reference_split"] == "val"
    )
    assert res["true_accuracy"] is not None and all(
        0 <= v <= 100 for v in res["estimated_accuracy"].values()
    )
    assert (
        main(
            [
                "estimate",
                "--model",
                "small-cnn",
                "--reference",
                "mnist",
                "--target",
                "mnist",
                "--split",
                "tset",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )


def test_estimate_refuses_bad_labels_without_leaving_a_directory(logits, capsys):
    np.save(
        logits / "bad_labels.npy", np.full(3000, 9, dtype=np.int64)
    )  # class 9 of a 5-class model
    out = logits / "bad"
    assert (
        main(
            [
                "estimate",
                "--reference",
                str(logits / "ref.npy"),
                "--reference-labels",
                str(logits / "bad_labels.npy"),
                "--target",
                str(logits / "tgt.npy"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class indices in [0, 4]" in err[0] and not out.exists()
