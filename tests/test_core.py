"""The delta engine on plain torch models: attach, activation, routing, merge, detach, freezing."""

import pytest
import torch
from conftest import randomize

import deltatune as dt


def test_attach_equals_base_at_init_and_changes_after_training_values(mlp):
    x = torch.randn(6, 8)
    y0 = mlp(x)
    paths = dt.attach(mlp, dt.LoRA(r=4, alpha=8, targets=["fc1", "fc2"]))
    assert paths == ["fc1", "fc2"]
    assert torch.allclose(mlp(x), y0)  # B starts at zero
    randomize(mlp)
    assert not torch.allclose(mlp(x), y0, atol=1e-3)
    with dt.disabled(mlp):
        assert torch.equal(mlp(x), y0)


def test_only_delta_and_kept_modules_train(mlp):
    dt.attach(mlp, dt.LoRA(targets=["fc1"], trainable_modules=["head"]))
    trainable = {n for n, p in mlp.named_parameters() if p.requires_grad}
    assert trainable == {"fc1.deltas.default.lora_A", "fc1.deltas.default.lora_B",
                         "head.copies.default.weight", "head.copies.default.bias"}
    loss = mlp(torch.randn(4, 8)).sum()
    loss.backward()
    assert all(p.grad is None for n, p in mlp.named_parameters() if n not in trainable)
    assert mlp.head.copies["default"].weight.grad is not None
    summary = dt.trainable_summary(mlp)
    assert summary.trainable == sum(p.numel() for n, p in mlp.named_parameters() if n in trainable)
    assert 0 < summary.percent < 100 and "trainable%" in str(summary)


def test_merge_unmerge_detach_exact(mlp):
    originals = {n: m for n, m in mlp.named_children()}
    weights = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    x = torch.randn(5, 8)
    dt.attach(mlp, dt.LoRA(r=3, alpha=6, targets=["fc1", "fc2", "head"]))
    randomize(mlp)
    y = mlp(x)
    assert dt.merge(mlp) == ["default"]
    assert torch.allclose(mlp(x), y, atol=1e-5)
    dt.unmerge(mlp)
    assert torch.allclose(mlp(x), y, atol=1e-5)
    for n, p in mlp.named_parameters():
        if n.endswith("base.weight"):
            assert torch.allclose(p, weights[n.replace(".base", "")], atol=1e-6)
    dt.detach(mlp)
    assert all(getattr(mlp, n) is m for n, m in originals.items())
    dt.attach(mlp, dt.LoRA(targets=["fc1"]))
    randomize(mlp)
    dt.detach(mlp)  # no merge in between: bit-exact
    assert all(getattr(mlp, n) is m for n, m in originals.items())
    for n, p in mlp.named_parameters():
        assert torch.allclose(p, weights[n], atol=1e-6)


def test_several_deltas_sum_and_switch(mlp):
    x = torch.randn(3, 8)
    y0 = mlp(x)
    dt.attach(mlp, dt.LoRA(targets=["fc1"]), name="a")
    randomize(mlp)
    dt.attach(mlp, dt.LoRA(targets=["fc1"]), name="b")
    randomize(mlp)
    fc1 = mlp.fc1
    h0 = fc1.base(x)
    ha = fc1.deltas["a"](x, h0, fc1) - h0
    hb = fc1.deltas["b"](x, h0, fc1) - h0
    dt.set_active(mlp, ["a", "b"])
    assert torch.allclose(fc1(x), h0 + ha + hb, atol=1e-6)
    dt.set_active(mlp, [])
    assert torch.allclose(mlp(x), y0)
    assert dt.delta_names(mlp) == ["a", "b"]


@pytest.mark.parametrize("tokens", [None, 1, 40])  # (B, in); decoding (masked path); long rows
def test_route_mixed_batch_equals_each_sample_alone(mlp, tokens):
    x = torch.randn(7, 8) if tokens is None else torch.randn(7, tokens, 8)
    for i, (name, r) in enumerate([("a", 2), ("b", 4), ("c", 3)]):
        dt.attach(mlp, dt.LoRA(r=r, alpha=2 * r, targets=["fc1", "fc2"] if i < 2 else ["fc1"],
                               trainable_modules=["head"] if i == 1 else []), name=name)
        randomize(mlp)
    names = ["a", "b", None, "c", "b", "a", None]
    with dt.route(mlp, names):
        mixed = mlp(x)
    for i, name in enumerate(names):
        if name is None:
            with dt.disabled(mlp):
                alone = mlp(x[i : i + 1])
        else:
            dt.set_active(mlp, [name])
            alone = mlp(x[i : i + 1])
        assert torch.allclose(mixed[i], alone[0], atol=1e-5), (i, name)


def test_route_falls_back_for_dora_and_conv(cnn):
    x = torch.randn(4, 3, 8, 8)
    dt.attach(cnn, dt.LoRA(r=2, targets=["conv1", "pw"], dora=True), name="d")
    randomize(cnn, 0.1)
    dt.attach(cnn, dt.LoRA(r=2, targets=["conv2"]), name="p")
    randomize(cnn, 0.1)
    names = ["d", "p", None, "d"]
    with dt.route(cnn, names):
        mixed = cnn(x)
    for i, name in enumerate(names):
        if name is None:
            with dt.disabled(cnn):
                alone = cnn(x[i : i + 1])
        else:
            dt.set_active(cnn, [name])
            alone = cnn(x[i : i + 1])
        assert torch.allclose(mixed[i], alone[0], atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"dora": True}, {"rslora": True, "bias": "lora_only"}])
def test_conv_lora_merge(cnn, kw):
    x = torch.randn(2, 3, 8, 8)
    dt.attach(cnn, dt.LoRA(r=2, alpha=4, targets=["conv1", "conv2", "pw"], **kw))
    randomize(cnn, 0.1)
    y = cnn(x)
    dt.merge(cnn)
    assert torch.allclose(cnn(x), y, atol=1e-4)
    dt.unmerge(cnn)
    assert torch.allclose(cnn(x), y, atol=1e-4)


def test_embedding_lora(tiny_lm):
    ids = torch.randint(0, 50, (3, 5))
    y0 = tiny_lm(ids)
    dt.attach(tiny_lm, dt.LoRA(r=4, targets=["embed", "proj"]))
    assert torch.allclose(tiny_lm(ids), y0, atol=1e-6)
    randomize(tiny_lm)
    y = tiny_lm(ids)
    dt.merge(tiny_lm)
    assert torch.allclose(tiny_lm(ids), y, atol=1e-5)
    dt.unmerge(tiny_lm)
    with dt.route(tiny_lm, ["default", None, "default"]):
        routed = tiny_lm(ids)
    assert torch.allclose(routed[0], y[0], atol=1e-5) and torch.allclose(
        routed[1], y0[1], atol=1e-5
    )


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_svd_inits_keep_outputs_and_detach_restores(mlp, init):
    x = torch.randn(4, 8)
    y0 = mlp(x)
    w = mlp.fc2.weight
    dt.attach(mlp, dt.LoRA(r=4, alpha=4, init=init, targets=["fc2"]))
    assert torch.allclose(mlp(x), y0, atol=1e-5)
    assert mlp.fc2.base.weight is not w  # residual weight, original kept aside
    randomize(mlp, 0.05)
    y = mlp(x)
    change = mlp.fc2.deltas["default"].delta_weight(mlp.fc2)["weight"]
    merged_view = mlp.fc2.base.weight + mlp.fc2.deltas["default"].product()
    assert torch.allclose(
        w + change, merged_view, atol=1e-5
    )  # delta_weight is relative to the original W
    dt.merge(mlp)
    assert torch.allclose(mlp(x), y, atol=1e-5)
    dt.unmerge(mlp)
    dt.detach(mlp)
    assert mlp.fc2.weight is w


def test_gaussian_init_and_dropout_train_mode(mlp):
    dt.attach(mlp, dt.LoRA(r=4, init="gaussian", dropout=0.5, targets=["fc1"]))
    d = mlp.fc1.deltas["default"]
    assert d.lora_B.abs().sum() == 0 and d.lora_A.std() < 1.0
    randomize(mlp)
    x = torch.randn(8, 8)
    mlp.train()
    assert not torch.allclose(mlp(x), mlp(x))  # dropout is live in training
    mlp.eval()
    assert torch.equal(mlp(x), mlp(x))


# -- bad input ----------------------------------------------------------------------------------
def test_unknown_targets_list_closest_names(mlp):
    with pytest.raises(dt.TargetError, match="closest existing names: fc1"):
        dt.attach(mlp, dt.LoRA(targets=["fc_1"]))
    assert dt.delta_names(mlp) == []


def test_unsupported_module_type(cnn):
    with pytest.raises(dt.TargetError, match="cannot host 'bn' \\(BatchNorm2d\\)"):
        dt.attach(cnn, dt.LoRA(targets=["bn"]))
    assert isinstance(cnn.bn, torch.nn.BatchNorm2d)


def test_attach_twice_and_bad_names(mlp):
    dt.attach(mlp, dt.LoRA(targets=["fc1"]), name="a")
    with pytest.raises(dt.StateError, match="already attached"):
        dt.attach(mlp, dt.LoRA(targets=["fc2"]), name="a")
    with pytest.raises(dt.StateError, match="must be letters"):
        dt.attach(mlp, dt.LoRA(targets=["fc2"]), name="a.b")
    assert isinstance(mlp.fc2, torch.nn.Linear)


def test_route_errors(mlp):
    dt.attach(mlp, dt.LoRA(targets=["fc1"]), name="a")
    with pytest.raises(dt.StateError, match="no delta named 'zz'.*attached: a"):
        with dt.route(mlp, ["a", "zz"]):
            pass
    dt.merge(mlp)
    with pytest.raises(dt.StateError, match="unmerge"):
        with dt.route(mlp, ["a"]):
            pass


def test_route_batch_size_mismatch(mlp):
    dt.attach(mlp, dt.LoRA(targets=["fc1"]), name="a")
    with dt.route(mlp, ["a", None]):
        with pytest.raises(dt.StateError, match="2 entries but the batch has 3"):
            mlp(torch.randn(3, 8))


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"r": 0}, "r"),
        ({"alpha": -1}, "alpha"),
        ({"dropout": 1.5}, "dropout"),
        ({"init": "magic"}, "init"),
        ({"bias": "some"}, "bias"),
        ({"target_regex": "("}, "target_regex"),
    ],
)
def test_bad_spec_values_name_the_field(kw, field):
    with pytest.raises(dt.SpecError, match=f"LoRA.{field}="):
        dt.LoRA(**kw)


def test_merge_refuses_to_switch_active_while_merged(mlp):
    dt.attach(mlp, dt.LoRA(targets=["fc1"]), name="a")
    dt.attach(mlp, dt.LoRA(targets=["fc1"]), name="b")
    dt.merge(mlp)
    with pytest.raises(dt.StateError, match="unmerge"):
        dt.set_active(mlp, ["a"])
