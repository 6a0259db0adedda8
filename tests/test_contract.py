"""Registry-driven contract: every registered method with a row in CONTRACT passes the same checks.

Methods without a row are skipped with the reason (their owners add a row when they are ready).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys

import pytest
import torch
from conftest import randomize
from torch import nn

import deltatune as dt
from deltatune.core import iter_hosts, registered_methods, spec_from_dict


class Tiny(nn.Module):
    """Linear layers, a LayerNorm and a bias-free Linear: something for every whole-layer method."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 16, bias=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(self.norm(torch.relu(self.fc1(x))))))


#: method name -> (spec kwargs, [(bad kwargs, field named in the error)], output tolerance)
CONTRACT = {
    "lora": (dict(r=2, targets=["fc1", "fc2"]), [({"r": 0}, "r")], 1e-5),
    "ia3": (dict(targets=["fc1", "fc2", "head"], feedforward=["fc2"]),
            [({"init": "zeros"}, "init"), ({"feedforward": [""]}, "feedforward")], 1e-5),
    "ssf": (dict(), [({"init": "uniform"}, "init"), ({"init_std": -1.0}, "init_std")], 1e-5),
    "bitfit": (dict(), [({"target_regex": "("}, "target_regex")], 1e-5),
    "ln_tuning": (dict(), [({"target_regex": "(["}, "target_regex")], 1e-5),
    "vera": (dict(r=4, targets=["fc1", "fc2"]),
             [({"r": 0}, "r"), ({"dropout": 1.0}, "dropout"), ({"projection_seed": -1}, "projection_seed"),
              ({"init": "ones"}, "init")], 1e-5),
    "oft": (dict(block_size=4, targets=["fc1", "fc2"]),
            [({"block_size": -4}, "block_size"), ({"r": 2}, "r"), ({"neumann_terms": 0}, "neumann_terms"),
             ({"eps": 0.0}, "eps"), ({"dropout": -0.1}, "dropout")], 1e-5),
    "boft": (dict(block_size=4, butterfly_factor=2, targets=["fc2", "head"]),
             [({"butterfly_factor": 0}, "butterfly_factor"), ({"block_num": 2}, "block_num"),
              ({"block_size": -2}, "block_size")], 1e-5),
    "adalora": (dict(init_r=3, target_r=2, targets=["fc1", "fc2"]),
                [({"target_r": 4, "init_r": 3}, "target_r"), ({"beta1": 1.0}, "beta1"), ({"delta_t": 0}, "delta_t")], 1e-5),
    "increlora": (dict(init_r=1, max_r=3, target_r=2, targets=["fc1", "fc2"]),
                  [({"init_r": 0}, "init_r"), ({"budget": -5}, "budget"), ({"grow_per_step": 0}, "grow_per_step")], 1e-5),
    "sparse": (dict(density=0.2),
               [({"density": 0.0}, "density"), ({"density": 1.5}, "density"), ({"selection": "top"}, "selection"),
                ({"counts": {"fc1": 0}}, "counts"), ({"seed": -1}, "seed")], 1e-5),
}

ALL_METHODS = sorted(n for n in registered_methods() if not n.startswith("_"))
#: methods that sit at transformer positions (attention, FFN, embeddings, the whole stack): their
#: contract runs on tiny BERT and Llama models in tests/test_methods_modules.py::test_contract
MODULE_METHODS = {"bottleneck", "compacter", "prompt", "prefix", "side", "mam", "unipelt", "unified"}
METHODS = sorted(CONTRACT)


def test_every_method_has_a_contract():
    missing = set(ALL_METHODS) - set(CONTRACT) - MODULE_METHODS
    assert not missing, f"add a CONTRACT row (or a module-method contract) for {sorted(missing)}"


def _row(method: str):
    return CONTRACT[method]


def _spec(method: str, **extra) -> dt.DeltaSpec:
    kwargs, _, _ = _row(method)
    return registered_methods()[method](**{**kwargs, **extra})


def _model() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


X = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))


def _delta_params(model: nn.Module, name: str) -> set[int]:
    return {id(p) for _, host in iter_hosts(model) if name in host.delta_names() for p in host.part(name).parameters()}


@pytest.mark.parametrize("method", METHODS)
def test_init_train_merge_unmerge_detach(method):
    _, _, tol = _row(method)
    model = _model()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    y_base = model(X)
    dt.attach(model, _spec(method), name="a")
    assert torch.allclose(model(X), y_base, atol=1e-6), "a fresh delta must leave the outputs unchanged"

    # only delta parameters train, and they all get finite gradients
    randomize(model, std=0.3)
    mine = _delta_params(model, "a")
    assert mine and all((id(p) in mine) == p.requires_grad for p in model.parameters())
    y = model(X)
    assert torch.isfinite(y).all() and (y - y_base).abs().max() > 1e-4, "a trained delta must change the outputs"
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters() if id(p) in mine]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters() if id(p) not in mine)

    with torch.no_grad():
        y = model(X)
        dt.merge(model)
        assert torch.allclose(model(X), y, atol=tol), "merged must equal unmerged"
        dt.unmerge(model)
        assert torch.allclose(model(X), y, atol=tol)
        with dt.disabled(model):
            assert torch.allclose(model(X), y_base, atol=tol)
    dt.detach(model)
    assert all(dict(model.named_modules())[k] is m for k, m in modules.items() if k), "detach gives back the modules"
    for n, p in model.named_parameters():
        assert torch.allclose(p, original[n], atol=tol), f"{n} not restored after merge/unmerge"
    assert torch.allclose(model(X), y_base, atol=tol)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(tmp_path, method):
    model = _model()
    spec = _spec(method)
    dt.attach(model, spec, name="a")
    randomize(model, std=0.3)
    with torch.no_grad():
        y = model(X)
    dt.save_adapter(model, tmp_path / "a", name="a")
    fresh = _model()
    dt.load_adapter(fresh, tmp_path / "a")
    assert dt.get_spec(fresh, "a") == spec
    with torch.no_grad():
        assert torch.equal(fresh(X), y)
    assert spec_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("method", METHODS)
def test_route_mixed_batch(method):
    model = _model()
    dt.attach(model, _spec(method), name="a")
    dt.attach(model, _spec(method), name="b")
    randomize(model, std=0.3)
    with torch.no_grad():
        with dt.route(model, ["a", None, "b", "a", "b", None]):
            mixed = model(X)
        alone = []
        for i, name in enumerate(["a", None, "b", "a", "b", None]):
            dt.set_active(model, [name] if name else [])
            alone.append(model(X[i : i + 1]))
    assert torch.allclose(mixed, torch.cat(alone), atol=1e-5)
    assert (alone[0] - alone[2]).abs().max() > 1e-4, "two deltas of the same method should differ after training"


@pytest.mark.parametrize("method", METHODS)
def test_bad_spec_values_name_the_field(method):
    _, bad, _ = _row(method)
    cls = registered_methods()[method]
    assert bad, f"{method}: list at least one bad value"
    for kwargs, field in bad:
        with pytest.raises(dt.SpecError, match=f"{cls.__name__}.{field}="):
            cls(**kwargs)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_misspelt_option_is_a_spec_error(method):
    cls = registered_methods()[method]
    with pytest.raises(dt.SpecError, match=f"{cls.__name__} has no option 'targetz'; did you mean targets"):
        cls(targetz=("x",))
    with pytest.raises(dt.SpecError, match="pass options by name"):
        cls(*range(len(dataclasses.fields(cls)) + 1))


@pytest.mark.parametrize("method", METHODS)
def test_public_and_copyable(method):
    _row(method)
    cls = registered_methods()[method]
    assert getattr(dt, cls.__name__) is cls, "every registered spec is exported by class name"
    assert cls.__doc__ and "arxiv.org" in (sys.modules[cls.__module__].__doc__ or ""), "paper link in the module docstring"
    model = _model()
    dt.attach(model, _spec(method), name="a")
    clone = copy.deepcopy(model)  # deep copies (e.g. for soups / EMA) keep working
    with torch.no_grad():
        assert torch.equal(clone(X), model(X))
