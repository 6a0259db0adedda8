"""Registry-driven contract: every registered method passes the same checks, from its own example.

Each spec class declares ``example = Example(...)`` (deltatune.core.example): the options, the tiny
model it attaches to (``"mlp"`` below, or ``"transformer"``: tiny BERT and Llama), its tolerance and
bad values. A method is tested by registering it; one without an example fails
:func:`test_every_method_declares_an_example`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import warnings

import pytest
import torch
from conftest import randomize
from torch import nn

import deltatune as dt
from deltatune.core import iter_hosts, registered_methods, spec_from_dict
from deltatune.core.example import Example


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


ALL_METHODS = sorted(registered_methods())
#: the declared examples (a method without one is reported by the first test, not here)
EXAMPLES: dict[str, Example] = {
    n: cls.__dict__["example"] for n, cls in registered_methods().items()
    if isinstance(cls.__dict__.get("example"), Example)
}
#: methods on whole layers: the checks below on :class:`Tiny`
METHODS = sorted(n for n, ex in EXAMPLES.items() if ex.model == "mlp")
#: methods at transformer positions (attention, FFN, embeddings, whole stack): tiny BERT and Llama
TRANSFORMER_METHODS = sorted(n for n, ex in EXAMPLES.items() if ex.model == "transformer")


def _undeclared(classes) -> str:
    """What to add, for each spec class that does not declare its own example ("" if none)."""
    missing = [cls for cls in classes if not isinstance(vars(cls).get("example"), Example)]
    return "; ".join(
        f"{cls.__module__}.{cls.__name__}: declare `example = Example(dict(<options>), "
        f"model='mlp' or 'transformer', tolerance=<atol>, bad=((<bad options>, <field>),))` "
        f"(deltatune.core.example) so the contract tests run on it"
        for cls in missing
    )


def test_every_method_declares_an_example():
    missing = _undeclared(registered_methods().values())
    assert not missing, missing


def test_an_undeclared_example_is_reported():
    class NoExample(dt.LoRA):  # inherits LoRA's example: not a declaration of its own
        method = "no_example"

    assert "NoExample: declare `example = Example(" in _undeclared([dt.LoRA, NoExample])
    assert _undeclared([dt.LoRA]) == ""


def _row(method: str) -> Example:
    return EXAMPLES[method]


def _spec(method: str, **extra) -> dt.DeltaSpec:
    return registered_methods()[method](**{**_row(method).options, **extra})


def _model() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


X = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))


def _delta_params(model: nn.Module, name: str) -> set[int]:
    return {id(p) for _, host in iter_hosts(model) if name in host.delta_names()
            for p in host.part(name).parameters()}


@pytest.mark.parametrize("method", METHODS)
def test_init_train_merge_unmerge_detach(method):
    example = _row(method)
    tol = example.tolerance
    model = _model()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    y_base = model(X)
    dt.attach(model, _spec(method), name="a")
    if example.identity_at_init:
        assert torch.allclose(model(X), y_base, atol=1e-6), "a fresh delta must not change outputs"

    # only delta parameters train, and they all get finite gradients
    randomize(model, std=0.3)
    mine = _delta_params(model, "a")
    assert mine and all((id(p) in mine) == p.requires_grad for p in model.parameters())
    y = model(X)
    assert torch.isfinite(y).all()
    assert (y - y_base).abs().max() > 1e-4, "a trained delta must change the outputs"
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters() if id(p) in mine]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters() if id(p) not in mine)

    with torch.no_grad():
        y = model(X)
        if example.merges:
            dt.merge(model)
            assert torch.allclose(model(X), y, atol=tol), "merged must equal unmerged"
            dt.unmerge(model)
            assert torch.allclose(model(X), y, atol=tol)
        else:
            with pytest.raises(dt.StateError, match="cannot be merged"):
                dt.merge(model)
        with dt.disabled(model):
            assert torch.allclose(model(X), y_base, atol=tol)
    dt.detach(model)
    after = dict(model.named_modules())
    assert all(after[k] is m for k, m in modules.items() if k), "detach gives back the modules"
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
    assert (alone[0] - alone[2]).abs().max() > 1e-4, "two trained deltas should differ"


@pytest.mark.parametrize("method", sorted(EXAMPLES))
def test_bad_spec_values_name_the_field(method):
    bad = _row(method).bad
    cls = registered_methods()[method]
    assert bad, f"{method}: list at least one bad value"
    for kwargs, field in bad:
        with pytest.raises(dt.SpecError, match=f"{cls.__name__}.{field}="):
            cls(**kwargs)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_misspelt_option_is_a_spec_error(method):
    cls = registered_methods()[method]
    message = f"{cls.__name__} has no option 'targetz'; did you mean targets"
    with pytest.raises(dt.SpecError, match=message):
        cls(targetz=("x",))
    with pytest.raises(dt.SpecError, match="pass options by name"):
        cls(*range(len(dataclasses.fields(cls)) + 1))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_public_and_documented(method):
    cls = registered_methods()[method]
    assert getattr(dt, cls.__name__) is cls, "every registered spec is exported by class name"
    module_doc = sys.modules[cls.__module__].__doc__ or ""
    assert cls.__doc__ and "arxiv.org" in module_doc, "paper link in the module docstring"


@pytest.mark.parametrize("method", METHODS)
def test_copyable(method):
    model = _model()
    dt.attach(model, _spec(method), name="a")
    clone = copy.deepcopy(model)  # deep copies (e.g. for soups / EMA) keep working
    with torch.no_grad():
        assert torch.equal(clone(X), model(X))


# -- methods at transformer positions: tiny BERT and Llama ---------------------------------------
def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=32, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2)
    return transformers.LlamaForCausalLM(config).eval()


TRANSFORMERS = {"bert": _tiny_bert, "llama": _tiny_llama}
IDS = torch.randint(3, 50, (4, 7), generator=torch.Generator().manual_seed(0))
MASK = torch.ones(4, 7, dtype=torch.long)
MASK[1, 5:] = 0  # sample 1 is padded after 5 tokens


def _run(model):
    return model(input_ids=IDS, attention_mask=MASK)[0]


@pytest.fixture
def one_thread():
    """Tiny models: starting threads costs more than the math (5x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("family", sorted(TRANSFORMERS))
@pytest.mark.parametrize("method", TRANSFORMER_METHODS)
def test_transformer_contract(tmp_path, one_thread, family, method):
    example = _row(method)
    model = TRANSFORMERS[family]()
    originals = dict(model.named_modules())
    y0 = _run(model)
    with warnings.catch_warnings():  # transformers' deprecation chatter
        warnings.simplefilter("ignore")
        dt.attach(model, _spec(method), name="a")
    if example.identity_at_init:
        assert torch.allclose(_run(model), y0, atol=1e-6), "a fresh delta must not change outputs"
    randomize(model, std=0.3)
    y = _run(model)
    assert torch.isfinite(y).all()
    assert not torch.allclose(y, y0, atol=1e-3), "a trained delta must change the outputs"
    y.pow(2).mean().backward()
    for n, p in model.named_parameters():  # deltas, and only deltas, receive gradients
        assert (p.grad is not None) == p.requires_grad, n
    dt.save_adapter(model, tmp_path / "a")
    other = TRANSFORMERS[family]()
    dt.load_adapter(other, tmp_path / "a")
    assert torch.equal(_run(other), y) and dt.get_spec(other, "a") == dt.get_spec(model, "a")
    with torch.no_grad():
        if example.merges:
            dt.merge(model)
            merged = _run(model)
            assert torch.allclose(merged, y, atol=example.tolerance), "merged must equal unmerged"
            dt.unmerge(model)
            assert torch.allclose(_run(model), y, atol=example.tolerance)
        else:
            with pytest.raises(dt.StateError, match="cannot be merged"):
                dt.merge(model)
            assert torch.equal(_run(model), y), "a refused merge leaves the model as it was"
    clone = copy.deepcopy(model)  # a deep copy has its own hosts (and hooks, for prompts/prefixes)
    assert torch.equal(_run(clone), y)
    dt.detach(clone)
    assert torch.equal(_run(clone), y0) and torch.allclose(_run(model), y, atol=example.tolerance)
    with dt.disabled(model):
        assert torch.allclose(_run(model), y0, atol=example.tolerance)
    dt.detach(model)
    restored = _run(model)  # the base exactly (to the tolerance where a merge touched the weights)
    if example.merges:
        assert torch.allclose(restored, y0, atol=example.tolerance)
    else:
        assert torch.equal(restored, y0)
    assert dict(model.named_modules()) == originals  # the very same module objects
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
