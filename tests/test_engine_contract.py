"""Engine contract v2 (issue 19): attach and merge are all or nothing, for every registered method;
the one target selector; what code outside methods asks a delta (factors, budget parameters)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core import registered_methods
from deltatune.core.host import DeltaHost


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 16, bias=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(self.norm(torch.relu(self.fc1(x))))))


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return Tiny().eval()
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    return BertModel(cfg).eval()


def _state(model: nn.Module):
    """Everything an attach could leave behind: module objects by path, parameters (identity, value,
    requires_grad), buffers, and the number of hooks on every module."""
    modules = {n: id(m) for n, m in model.named_modules()}
    params = {n: (id(p), p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    hooks = {
        n: sum(len(v) for k, v in vars(m).items() if "hook" in k and isinstance(v, dict))
        for n, m in model.named_modules()
    }
    return modules, params, buffers, hooks


def _same(a, b) -> bool:
    (ma, pa, ba, ha), (mb, pb, bb, hb) = a, b
    return (
        ma == mb
        and ha == hb
        and pa.keys() == pb.keys()
        and ba.keys() == bb.keys()
        and all(
            pa[k][0] == pb[k][0] and pa[k][2] == pb[k][2] and torch.equal(pa[k][1], pb[k][1])
            for k in pa
        )
        and all(torch.equal(ba[k], bb[k]) for k in ba)
    )


METHODS = sorted(registered_methods())


@pytest.mark.parametrize("method", METHODS)
def test_a_failed_attach_leaves_the_model_exactly_as_it_was(method, monkeypatch):
    """Fail the attach at every one of its sites in turn (and once after the last one, where the
    trainable copies are made): no host, parameter, buffer or hook is left behind, and an earlier
    delta is untouched."""
    cls = registered_methods()[method]
    example = cls.example
    model = _model(example.model)
    inner = model if example.model == "mlp" else model
    dt.attach(
        inner, dt.LoRA(r=2, targets=["fc2"] if example.model == "mlp" else ["key"]), name="earlier"
    )
    spec = cls(**dict(example.options))
    before = _state(model)
    calls = {"n": 0}
    original = DeltaHost.add

    def failing_add(self, name, delta, *, at):
        calls["n"] += 1
        if calls["n"] == at:
            raise RuntimeError("injected failure")
        return original(self, name, delta)

    # how many host additions a successful attach makes
    counting = _model(example.model)
    dt.attach(
        counting,
        dt.LoRA(r=2, targets=["fc2"] if example.model == "mlp" else ["key"]),
        name="earlier",
    )
    monkeypatch.setattr(
        DeltaHost, "add", lambda self, name, delta: failing_add(self, name, delta, at=-1)
    )
    dt.attach(counting, cls(**dict(example.options)), name="new")
    total, calls["n"] = calls["n"], 0
    for at in range(1, total + 1):
        monkeypatch.setattr(
            DeltaHost, "add", lambda self, name, delta, at=at: failing_add(self, name, delta, at=at)
        )
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="injected failure"):
            dt.attach(model, spec, name="new")
        assert _same(_state(model), before), (
            f"{method}: failing at host {at} of {total} left the model changed"
        )
    monkeypatch.setattr(DeltaHost, "add", original)
    # a failure after every site was built, where the trainable copies are made
    from deltatune.core.host import ModuleCopy

    def failing_copy(self, name, spec):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(ModuleCopy, "add", failing_copy)
    keep = "head" if example.model == "mlp" else "pooler"
    with pytest.raises((RuntimeError, dt.TargetError)):  # (a method that targets the head itself)
        dt.attach(model, spec.replace(trainable_modules=(keep,)), name="new")
    assert _same(_state(model), before), (
        f"{method}: failing at the trainable copy left the model changed"
    )
    assert dt.delta_names(model) == ["earlier"]


def test_a_refused_merge_leaves_no_host_merged():
    model = _model("mlp")
    x = torch.randn(4, 8)
    dt.attach(model, dt.LoRA(r=2, targets=["fc1"]), name="lora")
    dt.attach(
        model, dt.Bottleneck(targets=["fc2"], style="parallel"), name="adapter", activate=False
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    dt.set_active(model, ["lora", "adapter"])
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    y = model(x)
    with pytest.raises(dt.StateError, match="cannot be merged"):
        dt.merge(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert torch.equal(model(x), y)
    assert not any(h.merged for _, h in dt.core.iter_hosts(model))


def test_factors_and_budget_parameters_come_from_the_contract():
    model = _model("mlp")
    dt.attach(model, dt.LoRA(r=2, targets=["fc1"]), name="a")
    host = dict(dt.core.iter_hosts(model))["fc1"]
    delta = host.part("a")
    with torch.no_grad():
        delta.lora_B.normal_()
    (term,) = delta.factors(host)
    assert torch.allclose(
        term.scale * term.B @ term.A, delta.delta_weight(host)["weight"], atol=1e-6
    )
    assert delta.budget_parameters() == 2 * (8 + 16)
    dt.attach(model, dt.IA3(targets=["fc2"]), name="b")
    assert (
        dict(dt.core.iter_hosts(model))["fc2"].part("b").factors(None) is None
    )  # not low-rank: dense


def test_set_weight_change_is_exact_up_to_the_layer_rank():
    model = _model("mlp")
    dt.attach(model, dt.LoRA(r=8, targets=["fc1"]), name="a")
    host = dict(dt.core.iter_hosts(model))["fc1"]
    target = torch.randn(16, 5) @ torch.randn(5, 8)  # rank 5 <= r
    assert host.part("a").set_weight_change(target) < 1e-6
    assert torch.allclose(host.part("a").delta_weight(host)["weight"], target, atol=1e-5)


def test_the_one_selector_names_what_a_method_hosts():
    model = _model("mlp")
    with pytest.raises(
        dt.TargetError,
        match=r"BitFit cannot host 'fc2' \(Linear, a linear module\): it hosts "
        r"layer with a bias",
    ):
        dt.attach(model, dt.BitFit(targets=["fc2"]))
    with pytest.raises(
        dt.TargetError,
        match=r"LoRA cannot host 'norm' \(LayerNorm\): it hosts linear / conv / "
        r"embedding modules",
    ):
        dt.attach(model, dt.LoRA(targets=["norm"]))
    paths = dt.attach(model, dt.LNTuning())  # whole-layer default: every norm layer
    assert paths == ["norm"]
