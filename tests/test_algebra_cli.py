"""`deltatune merge CONFIG --out DIR`: results.json, one-line errors, no partial output."""

import json

import pytest
import yaml
from test_algebra_streaming import make_state, save_ckpt

from deltatune.cli.app import main


@pytest.fixture
def setup(tmp_path):
    base = make_state(0)
    save_ckpt(tmp_path / "base", base)
    for i in (1, 2):
        save_ckpt(tmp_path / f"m{i}", make_state(i, base), shards=2)
    bad = make_state(3, base)
    bad["lm_head.weight"][0, 0] = float("inf")
    save_ckpt(tmp_path / "bad", bad)

    def write(name="c.yaml", **changes):
        data = {"merge_method": "dare_ties", "base_model": "base",
                "models": [{"model": "m1", "parameters": {"weight": 1.0, "density": 0.5}},
                           {"model": "m2", "parameters": {"weight": 0.5, "density": 0.7}}]}
        data.update(changes)
        (tmp_path / name).write_text(yaml.safe_dump(data))
        return str(tmp_path / name)

    return tmp_path, write


def _one_line_error(capsys, match):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and match in err[0], err


def test_merge_writes_shards_and_results(setup, capsys):
    root, write = setup
    out = root / "out"
    assert (
        main(["merge", write(), "--out", str(out), "--shard-size", "4KB", "--seed", "3", "-q"]) == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert (
        results["job"] == "merge" and results["method"] == "dare_ties" and results["tensors"] == 13
    )
    assert results["shards"] > 1 and results["seconds"] >= 0 and results["peak_rss_mb"] > 0
    assert [m["parameters"]["density"] for m in results["models"]] == [0.5, 0.7]
    shard = "model-00001-of-%05d.safetensors" % results["shards"]
    first = (out / shard).read_bytes()
    # same seed → same random drops
    assert (
        main(
            [
                "merge",
                write(),
                "--out",
                str(root / "again"),
                "--shard-size",
                "4KB",
                "--seed",
                "3",
                "-q",
            ]
        )
        == 0
    )
    assert (root / "again" / shard).read_bytes() == first


def test_existing_output_and_overwrite(setup, capsys):
    root, write = setup
    out = root / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["merge", write(), "--out", str(out), "-q"]) == 2
    _one_line_error(capsys, "exists and is not empty; pass --overwrite")
    assert (out / "keep.txt").exists()
    # --overwrite replaces only a deltatune output: the user's own directory is refused, then a
    # merge's output is replaced with the user's file in it kept
    assert main(["merge", write(), "--out", str(out), "--overwrite", "-q"]) == 2
    _one_line_error(capsys, "holds files deltatune did not write")
    (out / "keep.txt").unlink()
    assert main(["merge", write(), "--out", str(out), "-q"]) == 0
    (out / "keep.txt").write_text("x")
    assert main(["merge", write(), "--out", str(out), "--overwrite", "-q"]) == 0
    assert (out / "keep.txt").read_text() == "x" and (out / "model.safetensors").exists()


@pytest.mark.parametrize("changes,match", [
    ({"base_model": None}, "needs base_model"),
    ({"models": [{"model": "m1"}, {"model": "bad"}]}, "NaN or inf"),
    ({"merge_method": "tie"}, "unknown merge method 'tie'"),
    ({"models": [{"model": "nowhere"}]}, "not found locally"),
    ({"dtype": "int8"}, "not a floating type"),
])
def test_bad_input_exits_2_with_one_line_and_no_output(setup, capsys, changes, match):
    root, write = setup
    data_changes = {k: v for k, v in changes.items() if v is not None}
    path = write(**data_changes)
    if changes.get("base_model", "x") is None:
        cfg = yaml.safe_load(open(path))
        del cfg["base_model"]
        open(path, "w").write(yaml.safe_dump(cfg))
    assert main(["merge", path, "--out", str(root / "out"), "-q"]) == 2
    _one_line_error(capsys, match)
    assert not (root / "out").exists() and not [
        p for p in root.iterdir() if p.name.startswith(".out")
    ]


def test_bad_shard_size_and_help(setup, capsys):
    root, write = setup
    assert main(["merge", write(), "--out", str(root / "o"), "--shard-size", "lots"]) == 2
    _one_line_error(capsys, "--shard-size 'lots' is not a size")
    assert main(["merge", "--help"]) == 0
    assert "mergekit" in capsys.readouterr().out
