"""Composition at inference: weighted sums, AdapterFusion, the LoRA mixture router, hot swap."""

import pytest
import torch
from conftest import MLP, randomize

import deltatune as dt
from deltatune import algebra as alg
from deltatune.algebra.errors import MergeError
from deltatune.core.errors import StateError


def _two_adapters(mlp, **kw):
    dt.attach(mlp, dt.LoRA(r=2, targets=["fc1", "fc2"], **kw), name="a")
    dt.attach(mlp, dt.LoRA(r=3, targets=["fc1", "fc2"], **kw), name="b")
    randomize(mlp)
    return mlp


def test_weighted_sum_equals_merging_the_weighted_task_vectors(mlp):
    base = {k: v.clone() for k, v in MLP().state_dict().items()}
    base.update(
        {
            k.replace(".base", ""): v.clone()
            for k, v in mlp.state_dict().items()
            if "deltas" not in k
        }
    )
    _two_adapters(mlp)
    x = torch.randn(6, 8)
    dt.set_active(mlp, ["a"])
    with alg.weighted(mlp, {"a": 0.7, "b": -0.4}):
        y = mlp(x)
        assert dt.active(mlp) == ["a", "b"]
    assert dt.active(mlp) == ["a"]
    tv = 0.7 * alg.TaskVector.from_adapter(mlp, "a") + (-0.4) * alg.TaskVector.from_adapter(
        mlp, "b"
    )
    ref = MLP().eval()
    ref.load_state_dict(tv.apply_to(base))
    assert torch.allclose(y, ref(x), atol=1e-5)
    with alg.weighted(mlp, {"a": 1.0, "b": 1.0}):
        both = mlp(x)
    dt.set_active(mlp, ["a", "b"])
    assert torch.allclose(both, mlp(x), atol=1e-6)
    with pytest.raises(StateError, match="no delta named 'c'"):
        alg.weighted(mlp, {"c": 1.0})


def test_weighted_heads_mix_their_contributions(mlp):
    dt.attach(mlp, dt.LoRA(r=2, targets=["fc1"], trainable_modules=["head"]), name="a")
    dt.attach(mlp, dt.LoRA(r=2, targets=["fc1"], trainable_modules=["head"]), name="b")
    randomize(mlp)
    x = torch.randn(3, 8)
    with alg.weighted(mlp, {"a": 1.0, "b": 0.0}):
        only_a = mlp(x)
    dt.set_active(mlp, ["a"])
    assert torch.allclose(only_a, mlp(x), atol=1e-6)


def test_adapter_fusion_starts_at_the_mean_and_trains_only_fusion(mlp, tmp_path):
    _two_adapters(mlp)
    x = torch.randn(16, 8)
    with alg.weighted(mlp, {"a": 0.5, "b": 0.5}):
        mean = mlp(x)
    fusion = alg.AdapterFusion(mlp, ["a", "b"])
    assert fusion.paths == ["fc1", "fc2"]
    with fusion:
        assert torch.allclose(mlp(x), mean, atol=1e-5)
        assert all(not p.requires_grad for n, p in mlp.named_parameters() if "deltas" in n)
        opt = torch.optim.Adam(fusion.parameters(), lr=1e-1)
        target = torch.randint(0, 3, (16,))
        losses = []
        for _ in range(15):
            loss = torch.nn.functional.cross_entropy(mlp(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        trained = mlp(x).detach()
        att = fusion.attention()
        assert set(att) == {"fc1", "fc2"} and torch.allclose(
            att["fc1"].sum(), torch.tensor(1.0), atol=1e-5
        )
    assert losses[-1] < losses[0] - 0.05
    fusion.save(tmp_path / "fusion.safetensors")
    fresh = alg.AdapterFusion(mlp, ["a", "b"])
    fresh.load(tmp_path / "fusion.safetensors")
    with fresh:
        assert torch.allclose(mlp(x), trained, atol=1e-6)
    assert all(p.requires_grad for n, p in mlp.named_parameters() if "deltas" in n)  # restored
    dt.set_active(mlp, ["a"])
    with alg.weighted(mlp, {"a": 1.0}):
        plain = mlp(x)
    assert torch.allclose(plain, mlp(x))


def test_lora_mixture_routes_top_k_and_reports_balance(mlp):
    _two_adapters(mlp)
    x = torch.randn(32, 8)
    mix = alg.LoRAMixture(mlp, ["a", "b"], top_k=1)
    with mix:
        y = mlp(x)
        gates = mix.layers["fc1"].last_gates
        assert ((gates > 0).sum(-1) == 1).all()  # exactly one adapter per sample
        usage = mix.usage()["fc1"]
        assert (
            torch.allclose(usage.sum(), torch.tensor(1.0)) and mix.aux_loss().item() >= 1.0 - 1e-5
        )
    both = alg.LoRAMixture(mlp, ["a", "b"], top_k=2)
    with both:
        with torch.no_grad():  # a uniform router over both adapters: their average
            for layer in both.layers.values():
                layer.gate.weight.zero_()
        uniform = mlp(x)
    with alg.weighted(mlp, {"a": 0.5, "b": 0.5}):
        assert torch.allclose(uniform, mlp(x), atol=1e-5)
    assert not torch.allclose(y, uniform)
    with pytest.raises(MergeError, match="top_k"):
        alg.LoRAMixture(mlp, ["a", "b"], top_k=3)


def test_hot_swap_replaces_weights_in_place(tmp_path, mlp):
    source = MLP().eval()
    source.load_state_dict(mlp.state_dict())
    dt.attach(source, dt.LoRA(r=2, targets=["fc1", "fc2"], trainable_modules=["head"]))
    randomize(source)
    dt.save_adapter(source, tmp_path / "new")
    dt.save_adapter(source, tmp_path / "new-peft", format="peft")
    x = torch.randn(4, 8)
    want = source(x)
    dt.attach(mlp, dt.LoRA(r=2, targets=["fc1", "fc2"], trainable_modules=["head"]))
    param = mlp.fc1.deltas["default"].lora_A
    alg.hot_swap(mlp, "default", tmp_path / "new")
    assert mlp.fc1.deltas["default"].lora_A is param  # same parameter object, new values
    assert torch.allclose(mlp(x), want, atol=1e-6)
    dt.merge(mlp)
    alg.hot_swap(mlp, "default", tmp_path / "new-peft")
    assert mlp.fc1.merged == ["default"] and torch.allclose(mlp(x), want, atol=1e-5)
    dt.attach(source, dt.LoRA(r=4, targets=["fc1", "fc2"]), name="wide")
    dt.save_adapter(source, tmp_path / "wide", name="wide")
    dt.unmerge(mlp)
    before = mlp(x)
    with pytest.raises(MergeError, match="r=4 but the attached delta has 2"):
        alg.hot_swap(mlp, "default", tmp_path / "wide")
    assert torch.equal(mlp(x), before)
    with pytest.raises(StateError, match="no delta named 'other'"):
        alg.hot_swap(mlp, "other", tmp_path / "new")
