"""C3A and RandLoRA: numeric parity with the real peft 0.21.2 (both directions), exact
merge/unmerge, per-sample routing, save/load in both formats, their defining properties, and bad
input."""

from __future__ import annotations

import copy
import json
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


def _bert():
    return tiny_bert(intermediate_size=48)


def _shake(named, prefixes: tuple[str, ...], seed: int) -> None:
    """Random values for every trained adapter tensor (never the frozen random bases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in named:
            if not any(p in name for p in prefixes):
                continue
            if "gamma" in name:  # RandLoRA's column scales: around their 1/m start
                t.copy_((1 + torch.rand(t.shape, generator=g)) / t.shape[-1])
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)


TRAINED = ("c3a_kernel", "randlora_lambda", "randlora_gamma")


def _shake_dt(model, name: str = "default") -> None:
    for path, host in iter_hosts(model):
        if name in host.delta_names():
            _shake(host.part(name).named_parameters(), TRAINED, zlib.crc32(path.encode()))


BERT_QVD, LLAMA_QVD = ("query", "value", "dense"), ("q_proj", "v_proj", "down_proj")
CASES = {  # (model, peft config class, peft options, deltatune spec)
    "bert-c3a": (_bert, "C3AConfig", {"block_size": 16, "target_modules": list(BERT_QVD)},
                 dt.C3A(block_size=16, targets=BERT_QVD)),
    "llama-c3a-pattern": (_llama, "C3AConfig",
                          {"block_size": 8, "block_size_pattern": {"q_proj": 4},
                           "init_weights": "gaussian", "target_modules": list(LLAMA_QVD)},
                          dt.C3A(block_size=8, block_size_pattern={"q_proj": 4},
                                 init="gaussian", targets=LLAMA_QVD)),
    "bert-randlora": (_bert, "RandLoraConfig",
                      {"r": 4, "randlora_alpha": 8, "target_modules": list(BERT_QVD)},
                      dt.RandLoRA(r=4, alpha=8, save_projection=True, targets=BERT_QVD)),
    "llama-randlora-r3-no-projection": (
        _llama, "RandLoraConfig", {"r": 3, "randlora_alpha": 6, "save_projection": False,
                                   "target_modules": list(LLAMA_QVD)},
        dt.RandLoRA(r=3, alpha=6, targets=LLAMA_QVD)),
    "llama-randlora-sparse": (
        _llama, "RandLoraConfig", {"r": 4, "randlora_alpha": 8, "sparse": True,
                                   "projection_prng_key": 5, "target_modules": list(LLAMA_QVD)},
        dt.RandLoRA(r=4, alpha=8, bases="sparse", projection_seed=5, save_projection=True,
                    targets=LLAMA_QVD)),
    "bert-randlora-very-sparse": (
        _bert, "RandLoraConfig", {"r": 8, "randlora_alpha": 16, "very_sparse": True,
                                  "save_projection": False, "target_modules": list(BERT_QVD)},
        dt.RandLoRA(r=8, alpha=16, bases="very_sparse", targets=BERT_QVD)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_parity_both_directions(tmp_path, case):
    make, config_cls, options, spec = CASES[case]
    base = make()
    y_base = _out(base)
    # peft → deltatune: a peft model with random adapter tensors, saved by peft
    pm = peft.get_peft_model(copy.deepcopy(base), getattr(peft, config_cls)(**options)).eval()
    _shake([*pm.named_parameters()], TRAINED, 1)
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
    init = "identity" if config_cls == "RandLoraConfig" else spec.init
    assert dt.get_spec(ours, "default").replace(targets=spec.targets, init=init) == spec


def test_randlora_saved_projection_is_what_loads(tmp_path):
    """With save_projection the file's bases are used, not ones drawn again from the seed: a
    peft config whose seed was changed afterwards still loads to the same outputs, both ways."""
    base = _bert()
    mine = copy.deepcopy(base)
    dt.attach(mine, dt.RandLoRA(r=4, alpha=8, save_projection=True, targets=BERT_QVD), name="a")
    _shake_dt(mine, "a")
    y = _out(mine)
    dt.save_adapter(mine, tmp_path / "p", name="a", format="peft")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    config["projection_prng_key"] = 99
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(config))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    assert (_out(back) - y).abs().max() <= 1e-5
    other = copy.deepcopy(base)
    dt.load_adapter(other, tmp_path / "p", name="a", verify=False)
    assert (_out(other) - y).abs().max() <= 1e-5


SPECS = {
    "c3a": dt.C3A(block_size=8, targets=LLAMA_QVD),
    "c3a-xavier": dt.C3A(block_size=4, init="xavier_uniform", targets=LLAMA_QVD),
    "randlora": dt.RandLoRA(r=4, alpha=8, targets=LLAMA_QVD),
    "randlora-sparse": dt.RandLoRA(r=3, alpha=6, bases="sparse", targets=LLAMA_QVD),
}


@pytest.mark.parametrize("which", sorted(SPECS))
def test_merge_unmerge_exact(which):
    model = _llama()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    y0 = _out(model)
    dt.attach(model, SPECS[which], name="a")
    if which != "c3a-xavier":
        assert torch.equal(_out(model), y0), "equals the base at init"
    _shake_dt(model, "a")
    y = _out(model)
    for path, host in iter_hosts(model):
        assert host.part("a").factors(host) is None, path  # full rank: no low-rank factors
    dt.merge(model)
    assert (_out(model) - y).abs().max() <= 1e-5
    dt.unmerge(model)
    assert (_out(model) - y).abs().max() <= 1e-5
    dt.detach(model)
    for n, p in model.named_parameters():
        assert (p - weights[n]).abs().max() <= 1e-6, n


def test_c3a_is_block_circulant():
    """Each b x b block of ΔW is circulant (row t is row 0 shifted right by t), times 1/in."""
    layer = torch.nn.Linear(12, 8)
    model = torch.nn.Sequential(layer)
    dt.attach(model, dt.C3A(block_size=4, init="gaussian", targets=("0",)), name="a")
    (_, host), = iter_hosts(model)
    delta = host.part("a")
    change = delta.delta_weight(host)["weight"] * 12
    k = delta.c3a_kernel.detach()
    for m in range(2):
        for n in range(3):
            blk = change[4 * m:4 * m + 4, 4 * n:4 * n + 4]
            for t in range(4):
                assert torch.allclose(blk[t], torch.roll(k[m, n], t), atol=1e-6)
    x = torch.randn(5, 12)
    assert torch.allclose(model(x), layer(x) + x @ (change / 12).t(), atol=1e-5)


def test_randlora_reaches_full_rank_with_few_parameters():
    """The change is full rank although it trains (r + m)·⌈m/r⌉ numbers, far fewer than m·M."""
    model = torch.nn.Sequential(torch.nn.Linear(24, 40))
    dt.attach(model, dt.RandLoRA(r=4, alpha=4, targets=("0",)), name="a")
    (_, host), = iter_hosts(model)
    _shake_dt(model, "a")
    delta = host.part("a")
    trained = sum(p.numel() for p in delta.parameters())
    assert trained == (4 + 24) * 6 < 24 * 40
    # full rank, if ill-conditioned: count in float64
    assert torch.linalg.matrix_rank(delta.delta_weight(host)["weight"].double()) == 24


@pytest.mark.parametrize("which", ["c3a", "randlora"])
def test_route_equals_each_sample_alone(which):
    model = _llama()
    for name in ("a", "b"):
        dt.attach(model, SPECS[which], name=name)
    _shake_dt(model, "a")
    _shake_dt(model, "b")
    with torch.no_grad():  # make "b" differ from "a" (same seeds per path)
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
    if fmt == "deltatune":
        assert dt.get_spec(other, "a") == SPECS[which]


@pytest.mark.parametrize("spec", [dt.C3A(block_size=8, targets=("c_attn", "c_proj")),
                                  dt.RandLoRA(r=4, alpha=8, targets=("c_attn", "c_proj"))])
def test_gpt2_conv1d_hosts(tmp_path, spec):
    """GPT-2's (in, out) Conv1D weights work; peft's C3A takes nn.Linear only, so saving C3A in
    peft's layout is refused in one line, while RandLoRA's peft file loads in peft."""
    model = _gpt2()
    y0 = _out(model)
    dt.attach(model, spec, name="a")
    _shake_dt(model, "a")
    y = _out(model)
    assert (y - y0).abs().max() > 1e-3
    dt.merge(model)
    assert (_out(model) - y).abs().max() <= 1e-5
    dt.unmerge(model)
    if isinstance(spec, dt.C3A):
        with pytest.raises(dt.DeltaFileError, match="nn.Linear only, not GPT-2 Conv1D"):
            dt.save_adapter(model, tmp_path / "p", name="a", format="peft")
        return
    dt.save_adapter(model, tmp_path / "p", name="a", format="peft")
    back = peft.PeftModel.from_pretrained(_gpt2(), tmp_path / "p").eval()
    assert (_out(back) - y).abs().max() <= 1e-5


def test_half_precision_base_gets_float32_deltas():
    model = _llama().to(torch.bfloat16)
    dt.attach(model, dt.C3A(block_size=8, targets=("q_proj",)), name="c")
    dt.attach(model, dt.RandLoRA(r=4, save_projection=True, targets=("v_proj",)), name="r")
    dt.set_active(model, ["c", "r"])
    for _, host in iter_hosts(model):
        for name in host.delta_names():
            assert all(t.dtype == torch.float32 for t in host.part(name).state_dict().values())
    assert _out(model).dtype == torch.bfloat16


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, wrong, right", [
    (dt.C3A, "block_sise", "block_size"), (dt.C3A, "block_size_patern", "block_size_pattern"),
    (dt.RandLoRA, "projection_sed", "projection_seed"), (dt.RandLoRA, "alfa", "alpha")])
def test_misspelt_option_names_the_closest(cls, wrong, right):
    message = f"{cls.__name__} has no option '{wrong}'; did you mean {right}"
    with pytest.raises(dt.SpecError, match=message):
        cls(**{wrong: 1})


@pytest.mark.parametrize("spec", [dt.C3A(targets=("word_embeddings",)),
                                  dt.RandLoRA(targets=("LayerNorm",))])
def test_module_kind_it_cannot_host(spec):
    model = _bert()
    kind = r"\((Embedding, a embedding module|LayerNorm)\)"
    with pytest.raises(dt.TargetError, match=rf"cannot host .*{kind}: it hosts Linear / GPT-2"):
        dt.attach(model, spec)
    assert not list(iter_hosts(model))


@pytest.mark.parametrize("spec, message", [
    (dt.C3A(block_size=5, targets=("query",)),
     r"C3A.block_size=5 gives block size 5 on '.*query', which does not divide both its sizes"),
    (dt.C3A(block_size=8, block_size_pattern={"intermediate.dense": 32},
            targets=("intermediate.dense",)), r"C3A.block_size_pattern="),
    (dt.RandLoRA(r=33, targets=("query",)), r"RandLoRA.r=33 is wider than '.*query'"),
])
def test_sizes_checked_before_anything_is_built(spec, message):
    model = _bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(dt.SpecError, match=message):
        dt.attach(model, spec)
    assert not list(iter_hosts(model))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("config_cls, options, message", [
    ("C3AConfig", {"block_size": 16, "bias": "all"}, "bias='all' is not supported"),
    ("RandLoraConfig", {"r": 4, "layers_to_transform": [0]},
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
