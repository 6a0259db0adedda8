"""MiSS and DeLoRA: numeric parity with the real peft 0.21.2 (both directions), exact merge/unmerge,
per-sample routing, save/load in both formats, their defining properties, and bad input."""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
from tiny_transformers import IDS, one_thread, tiny_bert  # noqa: F401 (one_thread: autouse fixture)
from tiny_transformers import output as _out
from tiny_transformers import tiny_gpt2 as _gpt2
from tiny_transformers import tiny_llama as _llama

import deltatune as dt
from deltatune.core import iter_hosts

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


_bert = tiny_bert


def _shake(named, prefix: str, seed: int) -> None:
    """Random values for every adapter tensor (parameters and DeLoRA's stored weight norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in named:
            if prefix in name:
                if name.endswith("w_norm") or "w_norm." in name:
                    t.mul_(1 + torch.rand(t.shape, generator=g))  # stays positive, but is not W's
                elif "lambda" in name:  # DeLoRA's strength: large enough to move the outputs
                    t.copy_(2 + torch.rand(t.shape, generator=g))
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)


def _shake_dt(model, name: str = "default") -> None:
    for path, host in iter_hosts(model):
        if name in host.delta_names():
            part = host.part(name)
            _shake([*part.named_parameters(), *part.named_buffers()], "", zlib.crc32(path.encode()))


# (model, peft config class, peft options, deltatune spec)
BERT_QVD, LLAMA_QVD = ("query", "value", "dense"), ("q_proj", "v_proj", "down_proj")
PATTERNS = {"rank_pattern": {"v_proj": 2}, "lambda_pattern": {r"layers\.1\..*q_proj": 7.5}}
CASES = {
    "bert-miss-balance-padded": (_bert, "MissConfig", {"r": 4, "target_modules": list(BERT_QVD)},
                                 dt.MiSS(r=4, targets=BERT_QVD)),
    "llama-miss-balance-r3": (_llama, "MissConfig", {"r": 3, "target_modules": list(LLAMA_QVD)},
                              dt.MiSS(r=3, targets=LLAMA_QVD)),
    "bert-miss-bat": (_bert, "MissConfig",
                      {"r": 4, "init_weights": "bat", "target_modules": ["query", "value"]},
                      dt.MiSS(r=4, variant="bat", targets=("query", "value"))),
    "llama-miss-bat": (_llama, "MissConfig",
                       {"r": 8, "init_weights": "bat", "target_modules": ["q_proj", "v_proj"]},
                       dt.MiSS(r=8, variant="bat", targets=("q_proj", "v_proj"))),
    "llama-miss-mini": (_llama, "MissConfig",
                        {"r": 4, "init_weights": "mini", "mini_r": 8,
                         "target_modules": list(LLAMA_QVD)},
                        dt.MiSS(r=4, variant="mini", mini_r=8, targets=LLAMA_QVD)),
    "bert-delora": (_bert, "DeloraConfig", {"r": 4, "target_modules": list(BERT_QVD)},
                    dt.DeLoRA(r=4, targets=BERT_QVD)),
    "llama-delora-patterns": (_llama, "DeloraConfig",
                              {"r": 4, "delora_lambda": 3, **PATTERNS,
                               "target_modules": list(LLAMA_QVD)},
                              dt.DeLoRA(r=4, delora_lambda=3, **PATTERNS, targets=LLAMA_QVD)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_parity_both_directions(tmp_path, case):
    make, config_cls, options, spec = CASES[case]
    torch.manual_seed(0)
    base = make()
    y_base = _out(base)
    # peft → deltatune: a peft model with random adapter tensors, saved by peft
    pm = peft.get_peft_model(copy.deepcopy(base), getattr(peft, config_cls)(**options)).eval()
    prefix = "miss_" if config_cls == "MissConfig" else "delora_"
    _shake([*pm.named_parameters(), *pm.named_buffers()], prefix, 1)
    y_peft = _out(pm)
    assert (y_peft - y_base).abs().max() > 1e-2, "the adapter must change the outputs"
    pm.save_pretrained(tmp_path / "from_peft")
    ours = copy.deepcopy(base)
    dt.load_adapter(ours, tmp_path / "from_peft")
    from_peft = (_out(ours) - y_peft).abs().max().item()
    # deltatune → peft: our adapter with random tensors, saved in peft's layout
    mine = copy.deepcopy(base)
    dt.attach(mine, spec, name="default")
    _shake_dt(mine)
    y_ours = _out(mine)
    assert (y_ours - y_base).abs().max() > 1e-2
    dt.save_adapter(mine, tmp_path / "from_dt", name="default", format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "from_dt").eval()
    to_peft = (_out(back) - y_ours).abs().max().item()
    print(f"\n{case}: peft->deltatune max|diff| {from_peft:.2e}, deltatune->peft {to_peft:.2e}")
    assert from_peft <= 1e-5 and to_peft <= 1e-5, (from_peft, to_peft)
    # the spec read from peft's config is the one that was saved
    assert dt.get_spec(ours, "default").replace(init="identity", targets=spec.targets) == spec


SPECS = {
    "balance": dt.MiSS(r=3, targets=("q_proj", "v_proj", "down_proj")),
    "bat": dt.MiSS(r=4, variant="bat", targets=("q_proj", "v_proj", "down_proj")),
    "mini": dt.MiSS(r=4, variant="mini", mini_r=8, targets=("q_proj", "v_proj", "down_proj")),
    "delora": dt.DeLoRA(r=4, targets=("q_proj", "v_proj", "down_proj")),
}


@pytest.mark.parametrize("which", sorted(SPECS))
def test_merge_unmerge_exact_and_factors(which):
    model = _llama()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    y0 = _out(model)
    dt.attach(model, SPECS[which], name="a")
    assert torch.equal(_out(model), y0), "equals the base at init"
    _shake_dt(model, "a")
    y = _out(model)
    for path, host in iter_hosts(model):
        delta = host.part("a")
        change = delta.delta_weight(host)["weight"]
        terms = delta.factors(host)
        if which == "bat":
            assert terms is None  # depends on the weight: not a fixed low-rank change
        else:  # exactly low-rank: the factors give the dense change
            (f,) = terms
            assert torch.allclose(f.scale * f.B @ f.A, change, atol=1e-6), path
    dt.merge(model)
    assert (_out(model) - y).abs().max() <= 1e-5
    dt.unmerge(model)
    assert (_out(model) - y).abs().max() <= 1e-5
    dt.detach(model)
    for n, p in model.named_parameters():
        assert (p - weights[n]).abs().max() <= 1e-6, n


def test_bat_is_the_blockwise_weight_map_and_unmerge_inverts_it():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 12)
    w = layer.weight.detach().clone()
    model = torch.nn.Sequential(layer)
    dt.attach(model, dt.MiSS(r=4, variant="bat", targets=("0",)), name="a")
    (_, host), = iter_hosts(model)
    m = host.part("a").miss_block
    with torch.no_grad():
        m.normal_(std=0.5)
    expect = w.clone()
    for a in range(3):  # W'_ac = W_ac (I + M_a) + M_a for every 4x4 block
        for c in range(2):
            blk = w[4 * a:4 * a + 4, 4 * c:4 * c + 4]
            expect[4 * a:4 * a + 4, 4 * c:4 * c + 4] = blk @ (torch.eye(4) + m[a]) + m[a]
    assert torch.allclose(w + host.part("a").delta_weight(host)["weight"], expect, atol=1e-6)
    x = torch.randn(5, 8)
    assert torch.allclose(model(x), torch.nn.functional.linear(x, expect, layer.bias), atol=1e-5)
    dt.merge(model)
    assert torch.allclose(layer.weight, expect, atol=1e-6)
    dt.unmerge(model)
    assert (layer.weight - w).abs().max() <= 1e-6


def test_miss_balance_sums_input_chunks():
    layer = torch.nn.Linear(7, 5)  # 7 = 2 chunks of 3 and one padded chunk
    model = torch.nn.Sequential(layer)
    dt.attach(model, dt.MiSS(r=3, targets=("0",)), name="a")
    (_, host), = iter_hosts(model)
    d = host.part("a").miss_block
    with torch.no_grad():
        d.normal_()
    change = host.part("a").delta_weight(host)["weight"]
    for i in range(7):
        assert torch.equal(change[:, i], d[i % 3])


def test_delora_strength_bounds_the_change():
    """‖ΔW‖_F ≤ λ·max_j ‖W_:,j‖ whatever A and B are: strength is decoupled from direction."""
    model = _bert()
    dt.attach(model, dt.DeLoRA(r=4, delora_lambda=2.0, targets=("query",)), name="a")
    for _, host in iter_hosts(model):  # the column norms of W, captured when the delta was built
        assert torch.allclose(host.part("a").delora_w_norm, host.weight.norm(dim=0))
    _shake_dt(model, "a")
    for _, host in iter_hosts(model):
        delta = host.part("a")
        with torch.no_grad():
            delta.delora_B.mul_(100.0)  # the size of B does not matter
        bound = delta.delora_lambda.abs().item() * delta.delora_w_norm.max().item()
        assert delta.delta_weight(host)["weight"].norm() <= bound * (1 + 1e-5)


@pytest.mark.parametrize("which", ["bat", "balance", "delora"])
def test_route_equals_each_sample_alone(which):
    model = _llama()
    for name in ("a", "b"):
        dt.attach(model, SPECS[which], name=name)
    _shake_dt(model, "a")
    _shake_dt(model, "b")
    names = ["a", None, "b"]
    with dt.route(model, names):
        mixed = _out(model)
    alone = []
    for i, name in enumerate(names):
        dt.set_active(model, [name] if name else [])
        with torch.no_grad():
            alone.append(model(input_ids=IDS[i:i + 1])[0])
    assert (mixed - torch.cat(alone)).abs().max() <= 1e-5
    assert (alone[0] - alone[2]).abs().max() > 1e-3


@pytest.mark.parametrize("which", sorted(SPECS))
@pytest.mark.parametrize("fmt", ["deltatune", "peft"])
def test_save_load_both_formats(tmp_path, which, fmt):
    model = _llama()
    dt.attach(model, SPECS[which], name="a")
    _shake_dt(model, "a")
    y = _out(model)
    dt.save_adapter(model, tmp_path / "a", name="a", format=fmt)
    other = _llama()
    dt.load_adapter(other, tmp_path / "a", name="a")
    assert (_out(other) - y).abs().max() <= (0 if fmt == "deltatune" else 1e-6)
    if fmt == "deltatune":
        assert dt.get_spec(other, "a") == SPECS[which]


@pytest.mark.parametrize("spec", [dt.MiSS(r=4, targets=("c_attn", "c_proj")),
                                  dt.MiSS(r=4, variant="bat", targets=("c_attn",)),
                                  dt.DeLoRA(r=4, targets=("c_attn", "c_proj"))])
def test_gpt2_conv1d_hosts_and_peft_refusal(tmp_path, spec):
    """GPT-2's (in, out) Conv1D weights work here; peft's tuners take nn.Linear only, so saving in
    peft's layout is refused in one line."""
    model = _gpt2()
    y0 = _out(model)
    dt.attach(model, spec, name="a")
    _shake_dt(model, "a")
    y = _out(model)
    assert (y - y0).abs().max() > 1e-3
    dt.merge(model)
    assert (_out(model) - y).abs().max() <= 1e-5
    dt.unmerge(model)
    with pytest.raises(dt.DeltaFileError, match="nn.Linear only, not GPT-2 Conv1D"):
        dt.save_adapter(model, tmp_path / "p", name="a", format="peft")


def test_half_precision_base_gets_float32_deltas():
    model = _llama().to(torch.bfloat16)
    dt.attach(model, dt.MiSS(r=4, variant="bat", targets=("q_proj",)), name="m")
    dt.attach(model, dt.DeLoRA(r=4, targets=("v_proj",)), name="d")
    dt.set_active(model, ["m", "d"])
    for _, host in iter_hosts(model):
        for name in host.delta_names():
            assert all(t.dtype == torch.float32 for t in host.part(name).state_dict().values())
    assert _out(model).dtype == torch.bfloat16


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, wrong, right", [
    (dt.MiSS, "mini_R", "mini_r"), (dt.MiSS, "varaint", "variant"),
    (dt.DeLoRA, "delora_lamda", "delora_lambda"), (dt.DeLoRA, "rank_patern", "rank_pattern")])
def test_misspelt_option_names_the_closest(cls, wrong, right):
    message = f"{cls.__name__} has no option '{wrong}'; did you mean {right}"
    with pytest.raises(dt.SpecError, match=message):
        cls(**{wrong: 1})


@pytest.mark.parametrize("spec", [dt.MiSS(targets=("word_embeddings",)),
                                  dt.DeLoRA(targets=("LayerNorm",))])
def test_module_kind_it_cannot_host(spec):
    model = _bert()
    kind = r"\((Embedding, a embedding module|LayerNorm)\)"
    with pytest.raises(dt.TargetError, match=rf"cannot host .*{kind}: it hosts linear modules"):
        dt.attach(model, spec)
    assert not list(iter_hosts(model))


@pytest.mark.parametrize("spec, message", [
    (dt.MiSS(r=64, targets=("query",)), r"MiSS.r=64 exceeds the 32 input features on '.*query'"),
    (dt.MiSS(r=5, variant="bat", targets=("query",)), r"MiSS.r=5 must divide both sizes"),
    (dt.MiSS(r=4, variant="mini", mini_r=5, targets=("query",)),
     r"MiSS.mini_r=5 must divide the 32 output"),
    (dt.DeLoRA(r=33, targets=("query",)),
     r"DeLoRA.r=33 gives rank 33 on '.*query', above that layer's limit 32"),
    (dt.DeLoRA(r=2, rank_pattern={"query": 40}, targets=("query",)), r"DeLoRA.rank_pattern="),
])
def test_sizes_checked_before_anything_is_built(spec, message):
    model = _bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(dt.SpecError, match=message):
        dt.attach(model, spec)
    assert not list(iter_hosts(model))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("config_cls, options, message", [
    ("MissConfig", {"r": 4, "bias": "all"}, "bias='all' is not supported"),
    ("DeloraConfig", {"r": 4, "layers_to_transform": [0]},
     r"layers_to_transform=\[0\] is not supported"),
])
def test_unsupported_peft_options_are_refused(tmp_path, config_cls, options, message):
    base = _bert()
    config = getattr(peft, config_cls)(target_modules=["query"], **options)
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    pm.save_pretrained(tmp_path / "p")
    with pytest.raises(dt.DeltaFileError, match=message):
        dt.load_adapter(base, tmp_path / "p")
    assert not list(iter_hosts(base))
