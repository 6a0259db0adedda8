"""Hardening of saved adapters (issue #25): checksums, refused tensor values, malformed configs,
sizes checked before anything is allocated, and `deltatune info` on any file."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import MLP, randomize
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt


def _saved(tmp_path, fmt="deltatune", **kw):
    torch.manual_seed(0)
    model = MLP().eval()
    dt.attach(
        model, dt.LoRA(r=4, alpha=8, targets=["fc1", "fc2"], trainable_modules=["head"], **kw)
    )
    randomize(model)
    path = dt.save_adapter(model, tmp_path / "a", format=fmt)
    return model, path


def _fresh():
    torch.manual_seed(0)
    return MLP().eval()


def _flip_data_byte(file):
    """Flip the lowest mantissa bit of the first float in the data section (a tiny, finite
    change)."""
    data = bytearray(file.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8 + header_len] ^= 0x01
    file.write_bytes(bytes(data))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# -- 1. checksums ----------------------------------------------------------------------------------
def test_flipped_bytes_are_refused_and_verify_false_loads_them(tmp_path):
    model, path = _saved(tmp_path)
    config = json.loads((path / "delta.json").read_text())
    assert len(config["checksums"]["delta.safetensors"]) == 64
    x = torch.randn(4, 8)
    want = model(x)
    _flip_data_byte(path / "delta.safetensors")
    fresh = _fresh()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(
        dt.DeltaFileError, match="delta.safetensors does not match the sha256"
    ) as exc:
        dt.load_adapter(fresh, path)
    assert "verify=False" in _one_line(exc)
    assert dt.delta_names(fresh) == [] and all(
        torch.equal(before[k], v) for k, v in fresh.state_dict().items()
    )
    assert dt.load_adapter(fresh, path, verify=False) == "default"  # hand-edited on purpose
    assert torch.allclose(fresh(x), want, atol=1e-4)  # one mantissa bit: nearly the same outputs


def test_adapters_saved_without_a_checksum_still_load(tmp_path):
    model, path = _saved(tmp_path)
    config = json.loads((path / "delta.json").read_text())
    del config["checksums"]
    (path / "delta.json").write_text(json.dumps(config))
    fresh = _fresh()
    dt.load_adapter(fresh, path)
    x = torch.randn(3, 8)
    assert torch.allclose(fresh(x), model(x), atol=1e-6)
    assert dt.read_adapter_info(path)["checksum"] == "none recorded"


def test_peft_layout_keeps_its_config_and_checks_a_side_file(tmp_path):
    peft = pytest.importorskip("peft")
    _, path = _saved(tmp_path, fmt="peft")
    config = json.loads((path / "adapter_config.json").read_text())
    assert "checksums" not in config  # peft's own file stays exactly peft's
    assert isinstance(peft.PeftConfig.from_pretrained(str(path)), peft.LoraConfig)
    assert dt.read_adapter_info(path)["checksum"] == "verified"
    _flip_data_byte(path / "adapter_model.safetensors")
    with pytest.raises(
        dt.DeltaFileError, match="adapter_model.safetensors does not match .*adapter_checksums.json"
    ):
        dt.load_adapter(_fresh(), path)
    dt.load_adapter(_fresh(), path, verify=False)
    (path / "adapter_checksums.json").unlink()  # as written by peft itself: nothing to verify
    dt.load_adapter(_fresh(), path)


# -- 2. values ------------------------------------------------------------------------------------
def _edit_tensors(path, change):
    file = path / "delta.safetensors"
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file))


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.update({k: v * 1e30 for k, v in t.items()}), "overflow to NaN"),
    (lambda t: t["fc1.lora_A"].view(-1).__setitem__(0, float("inf")), "NaN or inf"),
])
def test_huge_or_non_finite_values_are_refused(tmp_path, damage, message):
    _, path = _saved(tmp_path)
    _edit_tensors(path, damage)
    fresh = _fresh()
    with pytest.raises(dt.DeltaFileError, match=message) as exc:
        dt.load_adapter(
            fresh, path, verify=False
        )  # past the checksum, which refuses the edit first
    assert str(path) in _one_line(exc)
    assert dt.delta_names(fresh) == []


def test_integer_tensor_is_refused_not_cast(tmp_path):
    _, path = _saved(tmp_path)
    _edit_tensors(
        path,
        lambda t: t.update({"fc1.lora_B": torch.ones(t["fc1.lora_B"].shape, dtype=torch.int64)}),
    )
    fresh = _fresh()
    with pytest.raises(
        dt.DeltaFileError, match=r"tensor fc1.lora_B is I64 but must be float32"
    ) as exc:
        dt.load_adapter(fresh, path, verify=False)
    _one_line(exc)
    assert dt.delta_names(fresh) == []


# -- 3. malformed configs --------------------------------------------------------------------------
def _edit_config(cfg: dict, how: str) -> None:
    if how == "no spec":
        del cfg["spec"]
    elif how == "hosts 5":
        cfg["hosts"] = 5
    elif how == "list fingerprint":
        cfg["fingerprint"] = [1, 2]
    elif how == "fingerprint shape":
        cfg["fingerprint"]["modules"]["fc1"]["weight"] = "16x8"
    elif how == "spec r string":
        cfg["spec"]["r"] = "eight"
    elif how == "spec alpha list":
        cfg["spec"]["alpha"] = [8]
    elif how == "spec not object":
        cfg["spec"] = "lora"
    elif how == "version string":
        cfg["format_version"] = "1"
    elif how == "checksums list":
        cfg["checksums"] = ["abc"]
    elif how == "name number":
        cfg["name"] = 7


FIELDS = {
    "no spec": "'spec'",
    "hosts 5": "'hosts'",
    "list fingerprint": "'fingerprint'",
    "fingerprint shape": "'fingerprint.modules.fc1'",
    "spec r string": "LoRA.r",
    "spec alpha list": "LoRA.alpha",
    "spec not object": "'spec'",
    "version string": "'format_version'",
    "checksums list": "'checksums'",
    "name number": "'name'",
}


@pytest.mark.parametrize("how", sorted(FIELDS))
def test_malformed_delta_json_is_one_line_naming_file_and_field(tmp_path, how):
    _, path = _saved(tmp_path)
    cfg = json.loads((path / "delta.json").read_text())
    _edit_config(cfg, how)
    (path / "delta.json").write_text(json.dumps(cfg))
    fresh = _fresh()
    with pytest.raises(dt.DeltaFileError) as exc:
        dt.load_adapter(fresh, path)
    message = _one_line(exc)
    assert str(path / "delta.json") in message and FIELDS[how] in message, message
    assert dt.delta_names(fresh) == []
    if how not in ("spec r string", "spec alpha list"):  # info does not build the spec
        with pytest.raises(dt.DeltaFileError, match=FIELDS[how].replace(".", r"\.")):
            dt.read_adapter_info(path)


def test_corrupt_json_names_the_file(tmp_path):
    _, path = _saved(tmp_path)
    (path / "delta.json").write_text('{"format": "deltatune-delta", ')
    with pytest.raises(dt.DeltaFileError, match=r"delta\.json is not valid JSON") as exc:
        dt.load_adapter(_fresh(), path)
    assert str(path / "delta.json") in _one_line(exc)


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("r", "abc", "'r'"),
        ("lora_alpha", [8], "'lora_alpha'"),
        ("target_modules", 5, "'target_modules'"),
        ("peft_type", None, "'peft_type'"),
        ("rank_pattern", {"fc1": "x"}, "'rank_pattern.fc1'"),
    ],
)
def test_malformed_peft_config_names_file_and_field(tmp_path, field, value, named):
    _, path = _saved(tmp_path, fmt="peft")
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg[field] = value
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    fresh = _fresh()
    with pytest.raises(dt.DeltaFileError) as exc:
        dt.load_adapter(fresh, path)
    message = _one_line(exc)
    assert "adapter_config.json" in message and named in message, message
    assert dt.delta_names(fresh) == []


# -- 4. sizes --------------------------------------------------------------------------------------
def test_rank_above_the_layer_is_refused_before_allocating():
    model = _fresh()
    # 10**12 × 8 floats cannot be allocated: a SpecError (not an allocation error) proves the order
    with pytest.raises(
        dt.SpecError, match=r"LoRA.r: rank 1000000000000 on 'fc1' exceeds that layer's limit 8"
    ) as exc:
        dt.attach(model, dt.LoRA(r=10**12, targets=["fc1", "fc2"]))
    _one_line(exc)
    assert dt.delta_names(model) == [] and isinstance(model.fc1, nn.Linear)
    with pytest.raises(
        dt.SpecError, match=r"rank_pattern: rank 17 on 'fc2' exceeds that layer's limit 16"
    ):
        dt.attach(model, dt.LoRA(r=4, targets=["fc1", "fc2"], rank_pattern={"fc2": 17}))
    dt.attach(model, dt.LoRA(r=8, targets=["fc1"]))  # exactly the limit is fine


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            lambda: dt.AdaLoRA(init_r=10**9, target_r=2, targets=["fc1"]),
            r"AdaLoRA.init_r: rank 1000000000 on 'fc1' .* limit 8",
        ),
        (
            lambda: dt.IncreLoRA(init_r=1, max_r=10**9, target_r=2, targets=["fc1"]),
            r"IncreLoRA.max_r: .* limit 8",
        ),
        (lambda: dt.LoRA(r=10**9, targets=["conv2"]), r"on 'conv2' exceeds that layer's limit 8"),
    ],
)
def test_every_rank_option_is_checked_against_its_layer(spec, message):
    from conftest import SmallCNN

    model = SmallCNN() if "conv2" in message else _fresh()
    with pytest.raises(dt.SpecError, match=message):
        dt.attach(model, spec())
    assert dt.delta_names(model) == []


def test_vera_and_bottleneck_sizes_are_checked():
    with pytest.raises(
        dt.SpecError, match=r"VeRA.r=1000000000 makes the shared projection larger .* use r <= "
    ):
        dt.attach(_fresh(), dt.VeRA(r=10**9, targets=["fc1", "fc2"]))
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(
        dt.SpecError,
        match=r"reduction_factor=1e-09 makes the adapter on '0' \d+ wide, "
        r"wider than its input \(8\)",
    ):
        dt.attach(model, dt.Bottleneck(reduction_factor=1e-9, targets=["0"]))
    assert dt.delta_names(model) == []


def test_delta_larger_than_its_layer_warns_once():
    model = _fresh()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dt.attach(model, dt.LoRA(r=8, targets=["fc1", "fc2"]))  # fc1: 8·8 + 16·8 = 192 > 144
    larger = [w for w in caught if "larger than the layer it adapts" in str(w.message)]
    assert (
        len(larger) == 1
        and "1 of 2 modules" in str(larger[0].message)
        and "fc1: 192 parameters vs 144" in str(larger[0].message)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dt.attach(_fresh(), dt.LoRA(r=2, targets=["fc1", "fc2"]))
    assert not [w for w in caught if "larger than" in str(w.message)]


def test_edited_rank_in_delta_json_is_refused_before_allocating(tmp_path):
    _, path = _saved(tmp_path)
    cfg = json.loads((path / "delta.json").read_text())
    cfg["spec"]["r"] = 10**12
    (path / "delta.json").write_text(json.dumps(cfg))
    fresh = _fresh()
    with pytest.raises(
        dt.DeltaFileError, match=r"delta.json: field 'spec' is invalid: LoRA.r: rank 1000000000000"
    ) as exc:
        dt.load_adapter(fresh, path)
    _one_line(exc)
    assert dt.delta_names(fresh) == [] and isinstance(fresh.fc1, nn.Linear)


def test_header_shapes_are_compared_before_the_data_is_read(tmp_path, monkeypatch):
    _, path = _saved(tmp_path)
    cfg = json.loads((path / "delta.json").read_text())
    cfg["spec"]["r"] = 6  # within the layers' limits, but the file holds rank-4 factors
    (path / "delta.json").write_text(json.dumps(cfg))
    import deltatune.io.adapter as adapter

    def no_read(*a, **k):
        raise AssertionError("the tensor data was read before the shapes were compared")

    monkeypatch.setattr(adapter, "load_tensors", no_read)
    fresh = _fresh()
    with pytest.raises(
        dt.DeltaFileError,
        match=r"tensor fc1.lora_A has shape \(4, 8\) but the spec builds \(6, 8\)",
    ):
        dt.load_adapter(fresh, path)
    assert dt.delta_names(fresh) == []


@pytest.mark.slow
def test_real_model_rank_beyond_hidden_size_is_refused():
    from deltatune.models import load_model

    entry = load_model("minilm", num_labels=3)
    with pytest.raises(
        dt.SpecError, match=r"rank 100000 on '.*query' exceeds that layer's limit 384"
    ):
        dt.attach(entry.model, dt.LoRA(r=100000))
    assert dt.delta_names(entry.model) == []


# -- 5. the CLI: --no-verify and `deltatune info` on any file --------------------------------------
def _cli(capsys, *args) -> tuple[int, str, str]:
    from deltatune.cli.app import main

    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_info_shows_base_model_task_and_labels(tmp_path, capsys):
    _, path = _saved(tmp_path)
    (path / "task.json").write_text(
        json.dumps(
            {
                "model": "minilm",
                "data": "bbc-news",
                "task": "classification",
                "label_names": ["[PAD]", "sport", "tech"],
            }
        )
    )
    rc, out, _ = _cli(capsys, "info", path)
    assert rc == 0
    assert (
        "minilm" in out and "classification on bbc-news" in out and "3: [PAD], sport, tech" in out
    )
    assert "verified" in out
    rc, out, _ = _cli(capsys, "info", path, "--json")
    assert rc == 0 and json.loads(out)["task_info"]["label_names"] == ["[PAD]", "sport", "tech"]
    (path / "task.json").write_text(
        "{not json"
    )  # a broken task.json is reported, the rest still shown
    rc, out, _ = _cli(capsys, "info", path)
    assert rc == 0 and "not valid JSON" in out and "lora" in out


@pytest.mark.parametrize(
    "how",
    [
        "no spec",
        "hosts 5",
        "list fingerprint",
        "version string",
        "corrupt json",
        "flipped bytes",
        "peft r",
        "peft not object",
        "truncated tensors",
    ],
)
def test_info_never_crashes_on_a_malformed_adapter(tmp_path, capsys, how):
    _, path = _saved(tmp_path, fmt="peft" if how.startswith("peft") else "deltatune")
    if how == "corrupt json":
        (path / "delta.json").write_text('{"format": ')
    elif how == "flipped bytes":
        _flip_data_byte(path / "delta.safetensors")
    elif how == "truncated tensors":
        data = (path / "delta.safetensors").read_bytes()
        (path / "delta.safetensors").write_bytes(data[: len(data) // 3])
    elif how == "peft r":
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["r"] = "four"
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    elif how == "peft not object":
        (path / "adapter_config.json").write_text("[1, 2]")
    else:
        cfg = json.loads((path / "delta.json").read_text())
        _edit_config(cfg, how)
        (path / "delta.json").write_text(json.dumps(cfg))
    rc, out, err = _cli(capsys, "info", path)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], err
    if how == "flipped bytes":
        assert "--no-verify" in lines[0]
        rc, out, _ = _cli(capsys, "info", path, "--no-verify")
        assert rc == 0 and "lora" in out


def _small_cnn_adapter(tmp_path):
    """An adapter as `deltatune train` leaves it for a from-scratch base: delta, base weights,
    task.json."""
    from deltatune.io.files import save_tensors
    from deltatune.models import load_model

    torch.manual_seed(0)
    entry = load_model("small-cnn")
    base = {k: v.clone() for k, v in entry.model.state_dict().items()}
    dt.attach(entry.model, dt.LoRA(r=2, target_types=["Linear"]))
    randomize(entry.model, std=0.05)
    path = dt.save_adapter(entry.model, tmp_path / "adapter")
    save_tensors(path / "base.safetensors", base)
    (path / "task.json").write_text(json.dumps({"model": "small-cnn", "task": "classification",
                                                "label_names": [str(i) for i in range(10)]}))
    return path


def test_jobs_that_load_adapters_verify_and_take_no_verify(tmp_path, capsys):
    path = _small_cnn_adapter(tmp_path)
    _flip_data_byte(path / "delta.safetensors")
    for job in (
        ["export", "--adapter", path, "--out", tmp_path / "merged"],
        ["compress", path, "--codec", "int8", "--min-numel", "0", "--out", tmp_path / "int8"],
    ):
        rc, _, err = _cli(capsys, *job)
        assert (
            rc == 2 and "does not match the sha256" in err and len(err.strip().splitlines()) == 1
        ), err
        rc, _, err = _cli(capsys, *job, "--no-verify")
        assert rc == 0, err
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (
        tmp_path / "int8" / "delta.json"
    ).is_file()
    for job in ("eval", "detect", "estimate", "adapt"):
        rc, out, _ = _cli(capsys, job, "--help")
        assert rc == 0 and "--no-verify" in out, job
