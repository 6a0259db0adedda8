"""Trainable tokens: numeric parity with the real peft 0.21.2 (both directions), exact
merge/unmerge, only the chosen rows change and train, per-sample routing, save/load in both formats,
bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core import iter_hosts

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ROWS = (3, 7, 50, 99)
IDS = torch.tensor([[3, 10, 7, 7, 20, 99, 1, 2, 50], [5, 6, 8, 9, 11, 12, 13, 14, 15],
                    [99, 50, 3, 4, 4, 7, 30, 40, 60]])


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _llama(tie: bool = False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=40, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=37)
    return transformers.BertModel(cfg).eval()


MODELS = {"llama": _llama, "bert": _bert}


def _out(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=ids)[0]


def _delta(model, name: str = "a"):
    (path, host), = [(p, h) for p, h in iter_hosts(model) if name in h.delta_names()]
    return path, host, host.part(name)


def _shake(t: torch.Tensor, seed: int) -> None:
    with torch.no_grad():
        t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("family", sorted(MODELS))
def test_peft_parity_deltatune_to_peft(tmp_path, family):
    model = MODELS[family]()
    dt.attach(model, dt.TrainableTokens(token_indices=ROWS), name="a")
    _shake(_delta(model)[2].trainable_tokens_delta, 1)
    ours = _out(model)
    dt.save_adapter(model, tmp_path / "p", name="a", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _out(peft.PeftModel.from_pretrained(MODELS[family](), tmp_path / "p"))
    diff = (ours - theirs).abs().max().item()
    print(f"deltatune -> peft ({family}): max |diff| = {diff:.3g}")
    assert diff <= 1e-5 and (ours - _out(MODELS[family]())).abs().max() > 1e-2


@pytest.mark.parametrize("family", sorted(MODELS))
def test_peft_parity_peft_to_deltatune(tmp_path, family):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(MODELS[family](),
                                 peft.TrainableTokensConfig(token_indices=list(ROWS)))
        (layer,) = [m for m in pm.modules() if hasattr(m, "trainable_tokens_delta")]
        _shake(layer.trainable_tokens_delta["default"], 2)
        theirs = _out(pm)
        pm.save_pretrained(tmp_path / "p")
    model = MODELS[family]()
    dt.load_adapter(model, tmp_path / "p", name="a")
    assert dt.get_spec(model, "a").token_indices == ROWS
    ours = _out(model)
    diff = (ours - theirs).abs().max().item()
    print(f"peft -> deltatune ({family}): max |diff| = {diff:.3g}")
    assert diff <= 1e-5 and (ours - _out(MODELS[family]())).abs().max() > 1e-2


def test_merge_writes_rows_and_unmerge_restores_exactly():
    model = _llama()
    weight = model.model.embed_tokens.weight
    before = weight.detach().clone()
    dt.attach(model, dt.TrainableTokens(token_indices=ROWS), name="a")
    _, host, delta = _delta(model)
    _shake(delta.trainable_tokens_delta, 3)
    y = _out(model)
    dw = delta.delta_weight(host)["weight"]
    others = torch.ones(100, dtype=torch.bool)
    others[list(ROWS)] = False
    assert dw[others].abs().max() == 0 and dw[list(ROWS)].abs().min() > 0
    dt.merge(model)
    assert torch.equal(weight[list(ROWS)], delta.trainable_tokens_delta.detach())
    assert torch.equal(weight[others], before[others])
    assert (_out(model) - y).abs().max() <= 1e-6
    dt.unmerge(model)
    assert torch.equal(weight.detach(), before)  # bit-exact
    assert torch.equal(_out(model), y)


def test_only_chosen_rows_train():
    model = _llama()
    dt.attach(model, dt.TrainableTokens(token_indices=ROWS), name="a")
    _, host, delta = _delta(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "model.embed_tokens.deltas.a.trainable_tokens_delta"]
    ids = torch.tensor([[3, 10, 7, 20]])  # rows 3 and 7 are read; 50 and 99 are not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(input_ids=ids)[0].pow(2).mean().backward()
    grad = delta.trainable_tokens_delta.grad
    assert host.base.weight.grad is None
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0
    assert grad[2:].abs().sum() == 0
    # positions of other tokens are exactly the base embedding's output
    emb = host.base(ids)
    out = host(ids)
    assert torch.equal(out[0, [1, 3]], emb[0, [1, 3]])


def test_routing_per_sample():
    model = _llama()
    dt.attach(model, dt.TrainableTokens(token_indices=ROWS), name="a")
    dt.attach(model, dt.TrainableTokens(token_indices=(3, 50)), name="b")
    _shake(_delta(model, "a")[2].trainable_tokens_delta, 4)
    _shake(_delta(model, "b")[2].trainable_tokens_delta, 5)
    names = ["a", "b", None]
    with dt.route(model, names):
        mixed = _out(model)
    alone = []
    for i, name in enumerate(names):
        dt.set_active(model, [name] if name else [])
        alone.append(_out(model, IDS[i : i + 1]))
    assert torch.allclose(mixed, torch.cat(alone), atol=1e-5)
    assert (alone[0] - _out(_llama(), IDS[:1])).abs().max() > 1e-2


@pytest.mark.parametrize("fmt", ["deltatune", "peft"])
def test_save_load_round_trip(tmp_path, fmt):
    model = _llama()
    dt.attach(model, dt.TrainableTokens(token_indices=ROWS, init="random"), name="a")
    y = _out(model)
    dt.save_adapter(model, tmp_path / "x", name="a", format=fmt)
    other = _llama()
    dt.load_adapter(other, tmp_path / "x", name="a")
    assert torch.equal(_out(other), y)
    ours, back = dt.get_spec(model, "a"), dt.get_spec(other, "a")
    if fmt == "deltatune":
        assert back == ours
    else:  # peft's file names the module it targets
        assert (back.token_indices, back.init, back.targets) == (ROWS, "random",
                                                                 ("model.embed_tokens",))


def test_half_precision_base_gets_float32_rows():
    model = nn.Sequential(nn.Embedding(20, 8)).half()
    dt.attach(model, dt.TrainableTokens(token_indices=(1, 5), targets=("0",)), name="a")
    _, _, delta = _delta(model)
    assert delta.trainable_tokens_delta.dtype == torch.float32
    ids = torch.tensor([[1, 2, 5]])
    assert model(ids).dtype == torch.float16
    before = model[0].base.weight.detach().clone()
    _shake(delta.trainable_tokens_delta, 6)
    y = model(ids)
    dt.merge(model)
    assert torch.equal(model(ids), y)
    dt.unmerge(model)
    assert torch.equal(model[0].base.weight, before)


def test_bad_input():
    model = _llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dt.SpecError, match=r"token_indices=\(3, 100\) has 100, outside "
                       r"'model.embed_tokens' with 100 rows"):
        dt.attach(model, dt.TrainableTokens(token_indices=(3, 100)))
    with pytest.raises(dt.SpecError, match="TrainableTokens.token_indices=.* lists token 4 twice"):
        dt.TrainableTokens(token_indices=[4, 5, 4])
    with pytest.raises(dt.SpecError, match=r"token_indices=\(\) is empty"):
        dt.attach(model, dt.TrainableTokens())
    with pytest.raises(dt.SpecError, match="no option 'token_indice'; did you mean token_indices"):
        dt.TrainableTokens(token_indice=(1,))
    with pytest.raises(dt.TargetError, match=r"cannot host 'model.layers.0.self_attn.q_proj' "
                       r"\(Linear, a linear module\): it hosts plain nn.Embedding"):
        dt.attach(model, dt.TrainableTokens(token_indices=(1,), targets=("q_proj",)))
    assert not list(iter_hosts(model)) and all(
        torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_tied_embedding_is_refused():
    model = _llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(dt.SpecError, match="tied to 'lm_head'"):
        dt.attach(model, dt.TrainableTokens(token_indices=ROWS))
    assert not list(iter_hosts(model))
