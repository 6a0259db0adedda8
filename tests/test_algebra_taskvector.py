"""Task vectors from state dicts, checkpoints and adapters; arithmetic; LoRA-specific merges."""

import pytest
import torch
from conftest import MLP, randomize
from safetensors.torch import save_file

import deltatune as dt
from deltatune import algebra as alg
from deltatune.algebra.errors import MergeError


def _perturbed(model, seed, std=0.1):
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) * std for k, v in model.state_dict().items()}


def test_arithmetic_and_apply(mlp):
    base = mlp.state_dict()
    a, b = _perturbed(mlp, 1), _perturbed(mlp, 2)
    ta, tb = alg.TaskVector.from_state_dicts(base, a), alg.TaskVector.from_state_dicts(base, b)
    for k in base:
        assert torch.allclose(ta.apply_to(base)[k], a[k], atol=1e-6)
        assert torch.allclose((ta + tb).apply_to(base)[k], a[k] + b[k] - base[k], atol=1e-6)
        assert torch.allclose((ta - tb)[k], a[k] - b[k], atol=1e-6)
        assert torch.allclose((-ta).apply_to(a)[k], base[k], atol=1e-6)  # forgetting = negation
        assert torch.allclose((0.5 * ta)[k], (ta / 2)[k])
    assert ta.norm() > 0 and abs(ta.cosine(ta) - 1) < 1e-6 and abs(ta.cosine(-ta) + 1) < 1e-6
    ta.apply_to(mlp, scale=1.0)  # in place on a module
    assert all(torch.allclose(p, a[n], atol=1e-6) for n, p in mlp.named_parameters())


def test_from_checkpoints_sharded_and_file(tmp_path, mlp):
    base, ft = mlp.state_dict(), _perturbed(mlp, 3)
    save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    d = tmp_path / "ft"
    d.mkdir()
    names = list(ft)
    save_file(
        {k: ft[k].contiguous() for k in names[:3]}, str(d / "model-00001-of-00002.safetensors")
    )
    save_file(
        {k: ft[k].contiguous() for k in names[3:]}, str(d / "model-00002-of-00002.safetensors")
    )
    import json

    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: f"model-0000{1 if i < 3 else 2}-of-00002.safetensors" for i, k in enumerate(names)}}))
    tv = alg.TaskVector.from_checkpoints(tmp_path / "base.safetensors", d)
    assert set(tv) == set(base)
    assert all(torch.allclose(tv[k], ft[k] - base[k], atol=1e-6) for k in base)


def test_from_adapter_dense_and_factored_match_merge(mlp):
    base = {k: v.clone() for k, v in mlp.state_dict().items()}
    x = torch.randn(5, 8)
    dt.attach(mlp, dt.LoRA(r=3, alpha=6, targets=["fc1", "fc2"], trainable_modules=["head"]))
    randomize(mlp)
    y = mlp(x)
    dense = alg.TaskVector.from_adapter(mlp, "default")
    factored = alg.TaskVector.from_adapter(mlp, "default", factored=True)
    assert set(dense) == {"fc1.weight", "fc2.weight", "head.weight", "head.bias"}
    assert isinstance(factored["fc1.weight"], alg.LowRank) and factored["fc1.weight"].rank == 3
    assert factored.numel() < dense.numel()
    for k in dense:
        assert torch.allclose(factored.dense()[k], dense[k], atol=1e-6)
    fresh = MLP().eval()
    fresh.load_state_dict(base)
    dense.apply_to(fresh)
    assert torch.allclose(fresh(x), y, atol=1e-5)
    assert set(alg.TaskVector.from_adapter(mlp, "default", copies=False)) == {
        "fc1.weight",
        "fc2.weight",
    }


def test_from_adapter_dir_leaves_model_unchanged(tmp_path, mlp):
    dt.attach(mlp, dt.LoRA(r=2, targets=["fc1"]))
    randomize(mlp)
    want = alg.TaskVector.from_adapter(mlp, "default")
    dt.save_adapter(mlp, tmp_path / "peft", format="peft")
    other = MLP().eval()
    other.load_state_dict(
        {k.replace(".base", ""): v for k, v in mlp.state_dict().items() if "deltas" not in k}
    )
    before = {k: v.clone() for k, v in other.state_dict().items()}
    got = alg.TaskVector.from_adapter_dir(other, tmp_path / "peft", factored=True)
    assert torch.allclose(got.dense()["fc1.weight"], want["fc1.weight"], atol=1e-6)
    assert dt.delta_names(other) == [] and all(
        torch.equal(before[k], v) for k, v in other.state_dict().items()
    )


def test_save_load_round_trip_keeps_factors(tmp_path, mlp):
    dt.attach(mlp, dt.LoRA(r=2, targets=["fc1", "fc2"], trainable_modules=["head"]))
    randomize(mlp)
    tv = alg.TaskVector.from_adapter(mlp, "default", factored=True)
    tv.save(tmp_path / "tv.safetensors")
    back = alg.TaskVector.load(tmp_path / "tv.safetensors")
    assert (
        isinstance(back["fc2.weight"], alg.LowRank)
        and back["fc2.weight"].scale == tv["fc2.weight"].scale
    )
    assert all(torch.allclose(back.dense()[k], tv.dense()[k]) for k in tv)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(MergeError, match="not a deltatune task vector"):
        alg.TaskVector.load(tmp_path / "plain.safetensors")


def test_merge_task_vectors_lora_concat_exact_and_svd(mlp):
    dt.attach(mlp, dt.LoRA(r=2, alpha=4, targets=["fc1", "fc2"]), name="a")
    dt.attach(mlp, dt.LoRA(r=3, alpha=3, targets=["fc1", "fc2"]), name="b")
    randomize(mlp)
    ta, tb = (alg.TaskVector.from_adapter(mlp, n, factored=True) for n in ("a", "b"))
    cat = alg.merge_task_vectors([ta, tb], "lora_concat", weight=[0.5, 2.0])
    assert cat["fc1.weight"].rank == 5
    assert torch.allclose(
        cat["fc1.weight"].dense(),
        0.5 * ta["fc1.weight"].dense() + 2 * tb["fc1.weight"].dense(),
        atol=1e-5,
    )
    svd = alg.merge_task_vectors([ta, tb], "lora_svd", rank=2)
    assert svd["fc2.weight"].rank == 2
    with pytest.raises(MergeError, match="needs rank"):
        alg.merge_task_vectors([ta, tb], "lora_svd")
    # dense methods on task vectors equal the method on checkpoints (base + τ)
    base = {k: torch.randn(v.shape) for k, v in ta.dense().items()}
    merged = alg.merge_task_vectors([ta, tb], "ties", density=0.5, weight=[1.0, 0.7])
    direct = alg.merge_state_dicts(
        "ties",
        [ta.dense().apply_to(base), tb.dense().apply_to(base)],
        base,
        density=0.5,
        weight=[1.0, 0.7],
    )
    assert all(torch.allclose(merged.apply_to(base)[k], direct[k], atol=1e-5) for k in base)


def test_merge_adapters_attaches_one_lora(mlp):
    x = torch.randn(4, 8)
    dt.attach(mlp, dt.LoRA(r=2, targets=["fc1", "fc2"]), name="a")
    dt.attach(mlp, dt.LoRA(r=2, targets=["fc1", "fc2"]), name="b")
    randomize(mlp)
    dt.set_active(mlp, ["a", "b"])
    y_sum = mlp(x)
    alg.merge_adapters(mlp, ["a", "b"], "lora_concat", name="ab")
    assert dt.active(mlp) == ["ab"] and dt.get_spec(mlp, "ab").rank_for("fc1") == 4
    assert torch.allclose(mlp(x), y_sum, atol=1e-5)
    alg.merge_adapters(mlp, ["a", "b"], "ties", rank=2, density=0.8, name="ties2")
    assert dt.get_spec(mlp, "ties2").rank_for("fc2") == 2
    with pytest.raises(MergeError, match="pass rank"):
        alg.merge_adapters(mlp, ["a", "b"], "ties", name="bad")
    assert "bad" not in dt.delta_names(mlp)
