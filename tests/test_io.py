"""Saving and loading deltas: round trips, fingerprints, and every kind of bad file."""

import json

import pytest
import torch
from conftest import MLP, randomize

import deltatune as dt


def _trained(mlp, **kw):
    dt.attach(mlp, dt.LoRA(r=4, alpha=8, targets=["fc1", "fc2"], trainable_modules=["head"], **kw))
    randomize(mlp)
    return mlp


@pytest.mark.parametrize("fmt", ["deltatune", "peft"])
@pytest.mark.parametrize(
    "kw", [{}, {"dora": True}, {"rslora": True}, {"init": "pissa"}, {"bias": "all"}]
)
def test_round_trip(tmp_path, mlp, fmt, kw):
    x = torch.randn(5, 8)
    base = MLP().eval()
    base.load_state_dict(mlp.state_dict())
    _trained(mlp, **kw)
    y = mlp(x)
    dt.save_adapter(mlp, tmp_path / "a", format=fmt)
    assert dt.load_adapter(base, tmp_path / "a") == "default"
    assert torch.allclose(base(x), y, atol=1e-5)
    assert dt.get_spec(base, "default").method == "lora"


def test_saved_files_hold_only_delta_tensors(tmp_path, mlp):
    _trained(mlp)
    dt.save_adapter(mlp, tmp_path / "a")
    info = dt.read_adapter_info(tmp_path / "a")
    assert info["format"] == "deltatune" and info["method"] == "lora"
    assert info["hosts"] == ["fc1", "fc2"] and info["trainable_modules"] == ["head"]
    delta_params = sum(p.numel() for p in mlp.parameters() if p.requires_grad)
    assert info["num_parameters"] == delta_params
    config = json.loads((tmp_path / "a" / "delta.json").read_text())
    assert config["fingerprint"]["modules"]["fc1"]["weight"] == [16, 8]
    assert not list((tmp_path / "a").glob("*.tmp"))


def test_load_twice_needs_new_name(tmp_path, mlp):
    _trained(mlp)
    dt.save_adapter(mlp, tmp_path / "a")
    with pytest.raises(dt.StateError, match="already attached"):
        dt.load_adapter(mlp, tmp_path / "a")
    assert dt.load_adapter(mlp, tmp_path / "a", name="again") == "again"


def test_another_base_is_refused_and_model_unchanged(tmp_path, mlp):
    _trained(mlp)
    dt.save_adapter(mlp, tmp_path / "a")
    other = MLP(d_in=8, hidden=32)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(
        dt.DeltaFileError, match=r"another base model: fc1.weight is \(32, 8\) here but \(16, 8\)"
    ):
        dt.load_adapter(other, tmp_path / "a")
    assert dt.delta_names(other) == []
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_tensor_file(tmp_path, mlp, damage):
    _trained(mlp)
    dt.save_adapter(mlp, tmp_path / "a")
    f = tmp_path / "a" / "delta.safetensors"
    data = f.read_bytes()
    f.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x00" * 64 + data[64:], "empty": b""}[
            damage
        ]
    )
    fresh = MLP()
    with pytest.raises(dt.DeltaFileError, match="corrupt or truncated"):
        dt.load_adapter(fresh, tmp_path / "a")
    assert dt.delta_names(fresh) == [] and isinstance(fresh.fc1, torch.nn.Linear)


def test_newer_format_version(tmp_path, mlp):
    _trained(mlp)
    dt.save_adapter(mlp, tmp_path / "a")
    cfg = tmp_path / "a" / "delta.json"
    data = json.loads(cfg.read_text())
    data["format_version"] = 99
    cfg.write_text(json.dumps(data))
    with pytest.raises(dt.DeltaFileError, match="newer deltatune .*upgrade"):
        dt.load_adapter(MLP(), tmp_path / "a")


def test_unknown_spec_keys_warn(tmp_path, mlp):
    _trained(mlp)
    dt.save_adapter(mlp, tmp_path / "a")
    cfg = tmp_path / "a" / "delta.json"
    data = json.loads(cfg.read_text())
    data["spec"]["future_option"] = 3
    cfg.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="future_option"):
        dt.load_adapter(MLP(), tmp_path / "a")


def test_bad_json_and_missing_dir(tmp_path, mlp):
    with pytest.raises(dt.DeltaFileError, match="does not exist"):
        dt.load_adapter(mlp, tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(dt.DeltaFileError, match="neither delta.json nor adapter_config.json"):
        dt.load_adapter(mlp, tmp_path / "x")
    (tmp_path / "x" / "delta.json").write_text("{not json")
    with pytest.raises(dt.DeltaFileError, match="not valid JSON"):
        dt.load_adapter(mlp, tmp_path / "x")


def test_nan_tensor_refused(tmp_path, mlp):
    from safetensors.torch import load_file, save_file

    _trained(mlp)
    dt.save_adapter(mlp, tmp_path / "a")
    f = tmp_path / "a" / "delta.safetensors"
    tensors = load_file(str(f))
    key = next(iter(tensors))
    tensors[key][0] = float("nan")
    save_file(tensors, str(f))
    with pytest.raises(dt.DeltaFileError, match="NaN"):
        dt.load_adapter(
            MLP(), tmp_path / "a", verify=False
        )  # past the checksum, which also refuses the edit


def test_save_needs_name_when_several(tmp_path, mlp):
    dt.attach(mlp, dt.LoRA(targets=["fc1"]), name="a")
    dt.attach(mlp, dt.LoRA(targets=["fc2"]), name="b")
    with pytest.raises(dt.StateError, match="pass name="):
        dt.save_adapter(mlp, tmp_path / "x")
    with pytest.raises(dt.DeltaFileError, match="unknown format"):
        dt.save_adapter(mlp, tmp_path / "x", name="a", format="onnx")
    dt.save_adapter(mlp, tmp_path / "x", name="b")
    assert dt.read_adapter_info(tmp_path / "x")["hosts"] == ["fc2"]
