"""`deltatune merge` hardening: parameters checked when the config is read, non-finite merges
refused, side files and shards never read through links that leave the model directory, no
tracebacks."""

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from deltatune import algebra as alg
from deltatune.algebra import MergeConfigError, MergeError
from deltatune.cli.app import main


def save(directory, seed, **extra):
    """A tiny two-layer checkpoint (plus an integer tensor) with a config.json."""
    g = torch.Generator().manual_seed(seed)
    state = {f"model.layers.{i}.weight": torch.randn(6, 4, generator=g) for i in range(2)}
    state["model.layers.0.bias"] = torch.randn(6, generator=g)
    state["position_ids"] = torch.arange(6)
    state.update(extra)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    return directory


@pytest.fixture
def root(tmp_path, monkeypatch):
    for i, name in enumerate(["base", "m1", "m2"]):
        save(tmp_path / name, i)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(root, data, name="c.yaml"):
    (root / name).write_text(yaml.safe_dump(data))
    return str(root / name)


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def nothing_written(root, out="out"):
    assert not (root / out).exists()
    assert not [p.name for p in root.iterdir() if p.name.startswith(f".{out}")]


def models(*params):
    return [
        {"model": f"m{i + 1}", **({"parameters": p} if p else {})} for i, p in enumerate(params)
    ]


# -- 1. parameters are checked when the config is read --------------------------------------------
BAD = [
    (
        {"merge_method": "linear", "models": models({"weight": 1.0}, {"weight": -1.0})},
        ["weights [1.0, -1.0] sum to 0", "normalize: false"],
    ),
    (
        {
            "merge_method": "ties",
            "base_model": "base",
            "parameters": {"normalize": True},
            "models": models({"weight": 0.5, "density": 0.5}, {"weight": -0.5, "density": 0.5}),
        },
        ["sum to 0"],
    ),
    (
        {"merge_method": "linear", "models": models({"weight": float("nan")}, None)},
        ["models[0] (m1)", "'weight' must be a finite number", "nan"],
    ),
    (
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": models(None, {"weight": float("inf")}),
        },
        ["models[1] (m2)", "'weight' must be a finite number", "inf"],
    ),
    (
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": models({"weight": "nan"}, None),
        },
        ["'weight' must be a finite number"],
    ),
    (
        {"merge_method": "ties", "base_model": "base", "models": models({"density": 7}, None)},
        ["models[0] (m1)", "'density' must be a finite number in (0, 1], got 7"],
    ),
    (
        {
            "merge_method": "dare_ties",
            "base_model": "base",
            "models": models({"density": -1}, None),
        },
        ["'density' must be a finite number in (0, 1], got -1"],
    ),
    (
        {
            "merge_method": "ties",
            "base_model": "base",
            "parameters": {"density": 0},
            "models": models(None, None),
        },
        ["parameters:", "'density' must be a finite number in (0, 1]"],
    ),
    (
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": models({"density": [0.5, 3]}, None),
        },  # a gradient
        ["'density' must be a finite number in (0, 1], got 3"],
    ),
    (
        {
            "merge_method": "ties",
            "base_model": "base",
            "parameters": {"lambda": float("inf")},
            "models": models(None, None),
        },
        ["'lambda' must be a finite number"],
    ),
    (
        {
            "merge_method": "slerp",
            "base_model": "base",
            "parameters": {"t": 5},
            "models": models(None),
        },
        ["'t' must be a finite number in [0, 1], got 5"],
    ),
    (
        {
            "merge_method": "breadcrumbs",
            "base_model": "base",
            "models": models({"density": 0.5, "gamma": 3}, None),
        },
        ["'gamma' must be a finite number in [0, 1), got 3"],
    ),
    (
        {
            "merge_method": "della",
            "base_model": "base",
            "models": models({"density": 0.3, "epsilon": 0.4}, None),
        },
        ["density ± epsilon inside (0, 1)"],
    ),
    (
        {
            "merge_method": "della_linear",
            "base_model": "base",
            "models": models({"density": 0.5, "epsilon": 0.7}, None),
        },
        ["'epsilon' must be a finite number in [0, 0.5), got 0.7"],
    ),
    (
        {"merge_method": "regmean", "parameters": {"alpha": 2}, "models": models(None, None)},
        ["'alpha' must be a finite number in [0, 1], got 2"],
    ),
    (
        {"merge_method": "fisher", "parameters": {"floor": -1}, "models": models(None, None)},
        ["'floor' must be a finite number >= 0"],
    ),
    (
        {
            "merge_method": "dare_linear",
            "base_model": "base",
            "parameters": {"seed": 1.5},
            "models": models({"density": 0.5}),
        },
        ["'seed' must be an integer, got 1.5"],
    ),
    (
        {"merge_method": "linear", "models": models({"weight": int("1" + "0" * 400)}, None)},
        ["'weight' must be a finite number"],
    ),
    (
        {"merge_method": "ties", "base_model": "base", "models": models({"lamda": 1}, None)},
        ["has no parameter 'lamda'", "lambda"],
    ),
    # filters: the sum is zero only for the tensors the filter picks, so the error names one
    (
        {
            "merge_method": "linear",
            "models": models({"weight": [{"filter": "layers.1", "value": -1}, {"value": 1}]}, None),
        },
        ["tensor model.layers.1", "sum to 0"],
    ),
]


@pytest.mark.parametrize(
    "data,expect", BAD, ids=[f"{d['merge_method']}-{i}" for i, (d, _) in enumerate(BAD)]
)
def test_bad_parameters_exit_2_with_one_line_and_no_output(root, capsys, data, expect):
    assert main(["merge", write(root, data), "--out", "out", "-q"]) == 2
    line = one_line_error(capsys)
    for text in expect:
        assert text in line, line
    nothing_written(root)


def test_parameters_are_checked_when_the_config_is_parsed(root):
    # before any checkpoint is opened: the models need not even hold tensors yet
    with pytest.raises(MergeConfigError, match=r"models\[0\] \(m1\): ties parameter 'density'"):
        alg.parse_merge_config(
            {"merge_method": "ties", "base_model": "base", "models": models({"density": 7})}
        )
    with pytest.raises(MergeConfigError, match="unknown merge method"):
        alg.parse_merge_config({"merge_method": "tie", "models": models(None)})
    # weights summing to zero are fine without normalize, and a base listed among models is not
    # counted
    cfg = alg.parse_merge_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [{"model": "base"}, *models({"weight": 1}, {"weight": -1})],
        }
    )
    assert [m.parameters for m in cfg.non_base()] == [{"weight": 1}, {"weight": -1}]
    # the in-memory API shares the checks
    with pytest.raises(MergeConfigError, match="'density' must be a finite number in"):
        alg.get_method("ties").resolve([{"density": 1.5}], {})


# -- 1b. a merge whose result is not finite fails and leaves nothing ------------------------------
def test_non_finite_result_is_refused_and_nothing_is_left(root, capsys):
    data = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "parameters": {"lambda": 1e300},
        "models": models(None, None),
    }
    assert main(["merge", write(root, data), "--out", "out", "-q"]) == 2
    line = one_line_error(capsys)
    assert "merged tensor model.layers.0.bias has NaN or inf values" in line, line
    nothing_written(root)
    # finite in float32, but beyond float16: the cast to out_dtype overflows
    data = {"merge_method": "task_arithmetic", "base_model": "base", "out_dtype": "float16",
            "parameters": {"lambda": 1e6}, "models": models(None)}
    with pytest.raises(MergeError, match="merged tensor model.layers.0.bias has NaN or inf"):
        alg.merge_checkpoints(alg.parse_merge_config(data), root / "out")
    nothing_written(root)


def test_failed_overwrite_keeps_the_earlier_output(root, capsys):
    good = write(root, {"merge_method": "linear", "models": models(None, None)}, "good.yaml")
    assert main(["merge", good, "--out", "out", "-q"]) == 0
    before = (root / "out" / "model.safetensors").read_bytes()
    bad = write(
        root,
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "parameters": {"lambda": 1e300},
            "models": models(None),
        },
    )
    assert main(["merge", bad, "--out", "out", "--overwrite", "-q"]) == 2
    assert "NaN or inf" in one_line_error(capsys)
    assert (root / "out" / "model.safetensors").read_bytes() == before
    assert not [p.name for p in root.iterdir() if p.name.startswith(".out.")]


# -- 2. no link out of a model directory is followed -----------------------------------------------
@pytest.fixture
def secret(tmp_path):
    path = tmp_path.parent / f"{tmp_path.name}-secret.txt"
    path.write_text("TOP SECRET")
    yield path
    path.unlink()


@pytest.mark.parametrize("fname", ["tokenizer.json", "config.json", "tokenizer_config.json"])
def test_side_file_linking_out_of_the_model_is_refused(root, capsys, secret, fname):
    (root / "base" / fname).unlink(missing_ok=True)
    (root / "base" / fname).symlink_to(secret)
    data = {"merge_method": "task_arithmetic", "base_model": "base", "models": models(None)}
    assert main(["merge", write(root, data), "--out", "out", "-q"]) == 2
    line = one_line_error(capsys)
    assert f"base/{fname} resolves to {secret}, outside the model directory" in line, line
    nothing_written(root)


def test_links_inside_the_model_directory_are_copied(root):
    (root / "base" / "tok").mkdir()
    (root / "base" / "tok" / "tokenizer.json").write_text('{"inside": true}')
    (root / "base" / "tokenizer.json").symlink_to("tok/tokenizer.json")
    (root / "base" / "vocab.txt").symlink_to("missing.txt")  # dangling, inside: nothing to copy
    data = {"merge_method": "task_arithmetic", "base_model": "base", "models": models(None)}
    assert main(["merge", write(root, data), "--out", "out", "-q"]) == 0
    copied = root / "out" / "tokenizer.json"
    assert not copied.is_symlink() and json.loads(copied.read_text()) == {"inside": True}
    assert not (root / "out" / "vocab.txt").exists()


def test_shards_are_not_read_through_links_out_of_the_model(root, capsys, tmp_path_factory):
    elsewhere = save(tmp_path_factory.mktemp("elsewhere") / "ckpt", 5)
    linked = root / "linked"
    linked.mkdir()
    (linked / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    data = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": "linked"}],
    }
    assert main(["merge", write(root, data), "--out", "out", "-q"]) == 2
    assert "linked/model.safetensors resolves to" in one_line_error(capsys)
    nothing_written(root)
    # an index whose weight_map climbs out of the directory
    (linked / "model.safetensors").unlink()
    names = list(load_file(str(root / "m1" / "model.safetensors")))
    (linked / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "../m1/model.safetensors" for n in names}})
    )
    with pytest.raises(MergeError, match="outside the model directory"):
        alg.merge_checkpoints(alg.parse_merge_config(data), root / "out")
    nothing_written(root)


def test_hugging_face_cache_snapshot_links_are_followed(root):
    # models--org--name/snapshots/REV/model.safetensors -> ../../blobs/HASH: the repository folder
    # holds both
    repo = root / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    os.replace(root / "m1" / "model.safetensors", repo / "blobs" / "abc123")
    snap = repo / "snapshots" / "rev1"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to("../../blobs/abc123")
    data = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": str(snap)}],
    }
    assert main(["merge", write(root, data), "--out", "out", "-q"]) == 0
    assert (root / "out" / "model.safetensors").is_file()


# -- 3. output paths give one line, never a traceback ---------------------------------------------
def test_out_dot_and_unwritable_out_give_one_line(root, capsys, monkeypatch):
    data = {
        "merge_method": "linear",
        "models": [{"model": str(root / "m1")}, {"model": str(root / "m2")}],
    }
    cfg = write(root, data)
    empty = root / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert main(["merge", cfg, "--out", ".", "-q"]) == 2
    assert "--out ." in one_line_error(capsys)
    assert list(empty.iterdir()) == [] and not [
        p for p in root.iterdir() if p.name.startswith(".empty")
    ]
    # the library call refuses it too (a ValueError, not an OSError from renaming the current
    # directory)
    with pytest.raises(ValueError):
        alg.merge_checkpoints(alg.load_merge_config(cfg), ".")
    assert list(empty.iterdir()) == [] and not [
        p for p in root.iterdir() if p.name.startswith(".empty")
    ]
    monkeypatch.chdir(root)
    assert main(["merge", cfg, "--out", "c.yaml/sub", "-q"]) == 2  # under a file
    assert "cannot create the output directory c.yaml/sub" in one_line_error(capsys)
    assert not [p for p in root.iterdir() if p.name.startswith(".sub")]


# -- other inputs that crashed ---------------------------------------------------------------------
def test_empty_tensors_and_odd_config_json_merge(root):
    for i, name in enumerate(["base", "m1", "m2"]):
        save(root / name, i, empty=torch.zeros(0, 3), scalar=torch.tensor(float(i)))
    (root / "base" / "config.json").write_text(
        '["torch_dtype"]'
    )  # JSON, not an object: copied as is
    for method in ("della", "della_linear", "ties", "breadcrumbs", "model_stock"):
        params = None if method == "model_stock" else {"density": 0.5}
        data = {"merge_method": method, "base_model": "base", "dtype": "float32", "random_seed": 0,
                "models": models(params, params)}
        alg.merge_checkpoints(alg.parse_merge_config(data), root / method)
        merged = load_file(str(root / method / "model.safetensors"))
        assert (
            merged["empty"].shape == (0, 3)
            and torch.isfinite(merged["model.layers.0.weight"]).all()
        )
        assert (root / method / "config.json").read_text() == '["torch_dtype"]'


def test_mismatched_checkpoints_give_one_line(root, capsys):
    save(root / "wide", 7, **{"model.layers.0.weight": torch.randn(6, 5)})
    save(root / "double", 8, **{"model.layers.0.weight": torch.randn(6, 4, dtype=torch.float64)})
    save(root / "ids", 9, position_ids=torch.arange(6) + 1)
    for other, expect in [
        ("wide", "is (6, 4) in m1 but (6, 5) in wide"),
        ("double", "mixed dtypes"),
        ("ids", "integer tensor position_ids differs"),
    ]:
        data = {"merge_method": "linear", "models": [{"model": "m1"}, {"model": other}]}
        assert main(["merge", write(root, data), "--out", "out", "-q"]) == 2
        assert expect in one_line_error(capsys)
        nothing_written(root)
