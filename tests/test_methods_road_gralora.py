"""RoAd and GraLoRA: numeric parity with the real peft 0.21.2 (both directions), exact
merge/unmerge, per-sample routing, save/load in both formats, their defining properties, and bad
input."""

from __future__ import annotations

import copy
import warnings
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
    """Random values for every adapter tensor; RoAd's scales stay near 1 (an invertible R)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in named:
            if prefix in name:
                noise = torch.randn(t.shape, generator=g)
                if "road_alpha" in name:
                    t.copy_(1 + 0.3 * noise)
                elif "road_theta" in name:
                    t.copy_(0.8 * noise)
                else:
                    t.copy_(0.2 * noise)


def _shake_dt(model, name: str = "default") -> None:
    for path, host in iter_hosts(model):
        if name in host.delta_names():
            _shake(host.part(name).named_parameters(), "", zlib.crc32(path.encode()))


# (model, peft config class, peft options, deltatune spec)
LLAMA_QVD = ("q_proj", "v_proj", "down_proj")
CASES = {
    "bert-road_1": (_bert, "RoadConfig", {"group_size": 8, "target_modules": ["query", "value"]},
                    dt.RoAd(group_size=8, targets=("query", "value"))),
    "llama-road_2": (_llama, "RoadConfig",
                     {"variant": "road_2", "group_size": 8, "target_modules": list(LLAMA_QVD)},
                     dt.RoAd(variant="road_2", group_size=8, targets=LLAMA_QVD)),
    "llama-road_4": (_llama, "RoadConfig",
                     {"variant": "road_4", "group_size": 4, "target_modules": list(LLAMA_QVD)},
                     dt.RoAd(variant="road_4", group_size=4, targets=LLAMA_QVD)),
    "bert-gralora": (_bert, "GraloraConfig",
                     {"r": 4, "gralora_k": 2, "target_modules": ["query", "value"]},
                     dt.GraLoRA(r=4, k=2, targets=("query", "value"))),
    "llama-gralora-hybrid": (_llama, "GraloraConfig",
                             {"r": 8, "gralora_k": 4, "hybrid_r": 2, "alpha": 16,
                              "target_modules": list(LLAMA_QVD)},
                             dt.GraLoRA(r=8, k=4, hybrid_r=2, alpha=16, targets=LLAMA_QVD)),
    "gpt2-gralora-conv1d": (_gpt2, "GraloraConfig",
                            {"r": 4, "gralora_k": 2, "fan_in_fan_out": True,
                             "target_modules": ["c_attn", "c_proj"]},
                            dt.GraLoRA(r=4, k=2, targets=("c_attn", "c_proj"))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_parity_both_directions(tmp_path, case):
    make, config_cls, options, spec = CASES[case]
    base = make()
    y_base = _out(base)
    # peft → deltatune: a peft model with random adapter tensors, saved by peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), getattr(peft, config_cls)(**options)).eval()
    prefix = "road_" if config_cls == "RoadConfig" else "gralora_"
    _shake(pm.named_parameters(), prefix, 1)
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
    assert dt.get_spec(ours, "default").replace(targets=spec.targets) == spec


SPECS = {
    "road_1": dt.RoAd(group_size=8, targets=LLAMA_QVD),
    "road_2": dt.RoAd(variant="road_2", group_size=4, targets=LLAMA_QVD),
    "road_4": dt.RoAd(variant="road_4", group_size=8, targets=LLAMA_QVD),
    "gralora": dt.GraLoRA(r=4, k=2, targets=LLAMA_QVD),
    "gralora-hybrid": dt.GraLoRA(r=4, k=4, hybrid_r=2, alpha=8, targets=LLAMA_QVD),
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
    assert (y - y0).abs().max() > 1e-2
    for path, host in iter_hosts(model):
        delta = host.part("a")
        change = delta.delta_weight(host)["weight"]
        terms = delta.factors(host)
        if which.startswith("road"):
            assert terms is None  # R·W − W depends on the weight: not a fixed low-rank change
        else:  # exactly low-rank (k·r + hybrid_r): the factors give the dense change
            assert sum(t.scale * t.B @ t.A for t in terms).sub(change).abs().max() <= 1e-6, path
    dt.merge(model)
    assert (_out(model) - y).abs().max() <= 1e-5
    dt.unmerge(model)
    assert (_out(model) - y).abs().max() <= 1e-5
    dt.detach(model)
    for n, p in model.named_parameters():
        assert (p - weights[n]).abs().max() <= 1e-6, n


def test_road_rotates_pairs_of_output_features_bias_included():
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 8)
    model = torch.nn.Sequential(layer)
    dt.attach(model, dt.RoAd(variant="road_2", group_size=4, targets=("0",)), name="a")
    (_, host), = iter_hosts(model)
    delta = host.part("a")
    with torch.no_grad():
        delta.road_theta.uniform_(-3, 3)
        delta.road_alpha.uniform_(0.5, 2)
    theta, alpha = delta.road_theta.detach(), delta.road_alpha.detach()
    r = torch.zeros(8, 8)  # the dense R: features i and i+2 of each group of 4 form a pair
    for grp in range(2):
        for i in range(2):
            p, q = 4 * grp + i, 4 * grp + i + 2
            r[p, p], r[p, q] = alpha[p] * theta[p].cos(), -alpha[p] * theta[p].sin()
            r[q, q], r[q, p] = alpha[q] * theta[q].cos(), alpha[q] * theta[q].sin()
    x = torch.randn(6, 5)
    expect = layer(x) @ r.t()
    with torch.no_grad():
        assert torch.allclose(model(x), expect, atol=1e-6)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    dt.merge(model)
    assert torch.allclose(layer.weight, r @ w, atol=1e-6)
    assert torch.allclose(layer.bias, r @ b, atol=1e-6)
    dt.unmerge(model)  # the pairwise closed-form inverse equals R⁻¹
    assert (layer.weight - w).abs().max() <= 1e-6 and (layer.bias - b).abs().max() <= 1e-6


def test_gralora_blocks_have_rank_r_over_k():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 36))
    dt.attach(model, dt.GraLoRA(r=6, k=3, init="random", targets=("0",)), name="a")
    (_, host), = iter_hosts(model)
    change = host.part("a").delta_weight(host)["weight"]
    for j in range(3):
        for n in range(3):
            block = change[12 * j:12 * j + 12, 8 * n:8 * n + 8]
            assert torch.linalg.matrix_rank(block).item() == 2  # r/k
    assert torch.linalg.matrix_rank(change).item() == 18  # k·r, where a LoRA of rank r has 6


@pytest.mark.parametrize("which", ["road_1", "road_4", "gralora-hybrid"])
def test_route_equals_each_sample_alone(which):
    model = _llama()
    for name in ("a", "b"):
        dt.attach(model, SPECS[which], name=name)
    _shake_dt(model, "a")
    _shake_dt(model, "b")
    with torch.no_grad():  # make b differ from a (the shake is seeded by path)
        for _, host in iter_hosts(model):
            for p in host.part("b").parameters():
                p.mul_(-1.5)
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
    spec = dt.get_spec(other, "a")  # from peft: the targets are the module paths
    assert spec.replace(targets=SPECS[which].targets) == SPECS[which]


def test_road_on_gpt2_conv1d_and_peft_refusal(tmp_path):
    """GPT-2's (in, out) Conv1D weights work here; peft's RoAd takes nn.Linear only."""
    model = _gpt2()
    y0 = _out(model)
    dt.attach(model, dt.RoAd(group_size=8, targets=("c_attn", "c_proj")), name="a")
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
    dt.attach(model, dt.RoAd(group_size=8, targets=("q_proj",)), name="r")
    dt.attach(model, dt.GraLoRA(r=4, hybrid_r=2, targets=("v_proj",)), name="g")
    dt.set_active(model, ["r", "g"])
    for _, host in iter_hosts(model):
        for name in host.delta_names():
            assert all(t.dtype == torch.float32 for t in host.part(name).state_dict().values())
    assert _out(model).dtype == torch.bfloat16


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, wrong, right", [
    (dt.RoAd, "group_sise", "group_size"), (dt.RoAd, "varient", "variant"),
    (dt.GraLoRA, "hybrid_rank", "hybrid_r"), (dt.GraLoRA, "alpah", "alpha")])
def test_misspelt_option_names_the_closest(cls, wrong, right):
    message = f"{cls.__name__} has no option '{wrong}'; did you mean {right}"
    with pytest.raises(dt.SpecError, match=message):
        cls(**{wrong: 1})


@pytest.mark.parametrize("spec", [dt.RoAd(group_size=4, targets=("word_embeddings",)),
                                  dt.GraLoRA(r=2, targets=("LayerNorm",))])
def test_module_kind_it_cannot_host(spec):
    model = _bert()
    kind = r"\((Embedding, a embedding module|LayerNorm)\)"
    with pytest.raises(dt.TargetError, match=rf"cannot host .*{kind}: it hosts linear modules"):
        dt.attach(model, spec)
    assert not list(iter_hosts(model))


@pytest.mark.parametrize("spec, message", [
    (dt.RoAd(group_size=64, targets=("query",)),
     r"RoAd.group_size=64 must divide the 32 output features of '.*query'"),
    (dt.RoAd(group_size=2, targets=("intermediate.dense",)),
     r"RoAd.group_size=2 must divide the 37 output features"),
    (dt.GraLoRA(r=4, k=2, targets=("output.dense",)), r"GraLoRA.k=2 must divide both sizes"),
    (dt.GraLoRA(r=4, hybrid_r=40, targets=("query",)),
     r"GraLoRA.hybrid_r=40 exceeds the rank limit 32"),
])
def test_sizes_checked_before_anything_is_built(spec, message):
    model = _bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(dt.SpecError, match=message):
        dt.attach(model, spec)
    assert not list(iter_hosts(model))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_unsupported_peft_options_are_refused(tmp_path):
    base = _bert()
    config = peft.GraloraConfig(r=4, target_modules=["query"], bias="all")
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    pm.save_pretrained(tmp_path / "p")
    with pytest.raises(dt.DeltaFileError, match="bias='all' is not supported"):
        dt.load_adapter(base, tmp_path / "p")
    assert not list(iter_hosts(base))
