"""LoHa and LoKr (LyCORIS weight deltas): numeric parity with the real peft in both directions,
exact merge/unmerge, per-sample routing, save/load in both formats, and bad input.

The parity cases print their max |diff| (run with ``-s`` to read them)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import SmallCNN, randomize
from test_peft_parity import IDS, _bert, _llama, _out  # skips this file too without peft
from torch import nn

import deltatune as dt
from deltatune.core import iter_hosts
from deltatune.core.errors import DeltaFileError, SpecError, TargetError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SPECS = {"loha": dt.LoHa, "lokr": dt.LoKr}
CONFIGS = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: thread start-up would dominate on a busy machine
    yield
    torch.set_num_threads(n)


class Conv1dNet(nn.Module):
    """Conv1d layers (a k=3 one with groups, a pointwise one) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 12, 3, padding=1)
        self.c2 = nn.Conv1d(12, 12, 3, stride=2, groups=2)
        self.pw = nn.Conv1d(12, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.pw(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.head(x.mean(dim=2))


_IMG = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
_SEQ = torch.randn(2, 4, 11, generator=torch.Generator().manual_seed(2))
_TOK = {"input_ids": IDS}
_CNN, _C1D = ["conv1", "conv2", "pw"], ["c1", "c2", "pw"]

#: case → (method, model, inputs, targets, options shared by peft's config and our spec)
CASES = {
    "bert-loha": ("loha", _bert, _TOK, ["query", "value", "dense"], {"r": 4, "alpha": 8}),
    "llama-loha-patterns": ("loha", _llama, _TOK, ["q_proj", "v_proj", "down_proj"],
                            {"r": 2, "alpha": 4, "rank_pattern": {"down_proj": 3},
                             "alpha_pattern": {"v_proj": 2}}),
    "cnn-loha": ("loha", SmallCNN, _IMG, _CNN, {"r": 2, "alpha": 3}),
    "cnn-loha-cp": ("loha", SmallCNN, _IMG, _CNN, {"r": 2, "use_effective_conv2d": True}),
    "conv1d-loha-cp": ("loha", Conv1dNet, _SEQ, _C1D, {"r": 2, "use_effective_conv2d": True}),
    "bert-lokr-full": ("lokr", _bert, _TOK, ["query", "value", "dense"], {"r": 8, "alpha": 4}),
    "bert-lokr-both": ("lokr", _bert, _TOK, ["query", "value", "dense"],
                       {"r": 1, "decompose_both": True}),
    "llama-lokr-factor": ("lokr", _llama, _TOK, ["q_proj", "v_proj", "up_proj"],
                          {"r": 2, "decompose_factor": 4, "rank_pattern": {"up_proj": 1}}),
    "cnn-lokr": ("lokr", SmallCNN, _IMG, _CNN, {"r": 1, "alpha": 2}),
    "cnn-lokr-cp": ("lokr", SmallCNN, _IMG, _CNN, {"r": 1, "use_effective_conv2d": True}),
    "conv1d-lokr-full": ("lokr", Conv1dNet, _SEQ, _C1D, {"r": 8}),
    # (Conv1d LoKr with use_effective_conv2d is not a case: peft 0.21.2 fails on it in torch.kron)
}


def _base(make) -> nn.Module:
    torch.manual_seed(0)
    return make().eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_file_loads_in_deltatune(tmp_path, case):
    method, make, inputs, targets, opts = CASES[case]
    base = _base(make)
    # init_weights=False: every factor random, so the adapter really changes the outputs
    config = CONFIGS[method](target_modules=targets, init_weights=False, **copy.deepcopy(opts))
    pm = peft.get_peft_model(copy.deepcopy(base), config).eval()
    y_peft = _out(pm, inputs)
    assert (y_peft - _out(base, inputs)).abs().max() > 1e-3
    pm.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    name = dt.load_adapter(ours, tmp_path)
    spec = dt.get_spec(ours, name)
    assert type(spec) is SPECS[method] and all(getattr(spec, k) == v for k, v in opts.items())
    diff = (_out(ours, inputs) - y_peft).abs().max().item()
    print(f"\n{case} peft -> deltatune max|diff| = {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_file_loads_in_peft(tmp_path, case):
    method, make, inputs, targets, opts = CASES[case]
    base = _base(make)
    ours = copy.deepcopy(base)
    dt.attach(ours, SPECS[method](targets=targets, **opts))
    randomize(ours)
    y_ours = _out(ours, inputs)
    assert (y_ours - _out(base, inputs)).abs().max() > 1e-3
    dt.save_adapter(ours, tmp_path, format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    diff = (_out(back, inputs) - y_ours).abs().max().item()
    print(f"\n{case} deltatune -> peft max|diff| = {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(SPECS))
def test_minilm_parity_both_directions(tmp_path, method):
    """all-MiniLM-L6-v2 (query, value, peft's defaults): both directions equal to 1e-5."""
    from deltatune.models.entry import ModelError
    from deltatune.models.text import minilm

    try:
        enc = minilm(2).model.encoder.eval()
    except ModelError as exc:
        pytest.skip(str(exc))
    g = torch.Generator().manual_seed(0)
    ids = {"input_ids": torch.randint(0, 30000, (4, 64), generator=g)}
    torch.manual_seed(0)
    config = CONFIGS[method](target_modules=["query", "value"], init_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(enc), config).eval()
    y_peft = _out(pm, ids)
    pm.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(enc)
    dt.load_adapter(ours, tmp_path / "peft")
    y_ours = _out(ours, ids)
    dt.save_adapter(ours, tmp_path / "dt", format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(enc), tmp_path / "dt").eval()
    d1, d2 = (y_ours - y_peft).abs().max().item(), (_out(back, ids) - y_ours).abs().max().item()
    print(f"\nMiniLM {method}: peft -> deltatune {d1:.2e}, deltatune -> peft {d2:.2e}")
    assert d1 <= 1e-5 and d2 <= 1e-5


def test_lokr_splits_sizes_as_peft_does():
    from peft.tuners.lokr.layer import factorization as reference

    from deltatune.methods.lokr import factorization

    for n in range(1, 300):
        for f in (-1, 1, 2, 3, 4, 7, 16, 1000):
            assert factorization(n, f) == reference(n, f), (n, f)


def test_lokr_kronecker_product_is_torch_kron():
    from deltatune.methods.lokr import kron

    g = torch.Generator().manual_seed(0)
    for sa, sb in [((3, 2), (4, 5)), ((3, 2, 1, 1), (4, 2, 3, 3)), ((3, 2), (4, 2, 3))]:
        a, b = torch.randn(sa, generator=g), torch.randn(sb, generator=g)
        assert torch.equal(kron(a, b), torch.kron(a, b)), (sa, sb)


# -- engine behaviour --------------------------------------------------------------------------
VARIANTS = {
    "loha": (dt.LoHa, {"r": 2}), "loha-cp": (dt.LoHa, {"r": 2, "use_effective_conv2d": True}),
    "lokr": (dt.LoKr, {"r": 1}), "lokr-both": (dt.LoKr, {"r": 1, "decompose_both": True}),
    "lokr-cp": (dt.LoKr, {"r": 1, "use_effective_conv2d": True}),
    "lokr-lycoris": (dt.LoKr, {"r": 8, "init": "lycoris"}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_identity_at_init_merge_unmerge_exact(variant):
    cls, opts = VARIANTS[variant]
    model = _base(SmallCNN)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    y0 = _out(model, _IMG)
    dt.attach(model, cls(targets=_CNN, **opts))
    assert torch.equal(_out(model, _IMG), y0)  # one zero factor: ΔW = 0 exactly
    randomize(model)
    y = _out(model, _IMG)
    assert (y - y0).abs().max() > 1e-3
    dt.merge(model)
    assert (_out(model, _IMG) - y).abs().max() <= 1e-5
    dt.unmerge(model)  # float rounding only: the same ΔW is subtracted
    assert (_out(model, _IMG) - y).abs().max() <= 1e-5
    dt.detach(model)
    for k, v in model.state_dict().items():
        assert (v - weights[k]).abs().max() <= 1e-6, k


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_routing_equals_each_sample_alone(variant):
    cls, opts = VARIANTS[variant]
    model = _base(SmallCNN)
    dt.attach(model, cls(targets=_CNN, **opts), name="a")
    dt.attach(model, cls(targets=["conv2", "pw"], **{**opts, "alpha": 3.0}), name="b")
    randomize(model)
    x = torch.cat([_IMG, _IMG.flip(0)])  # 4 samples
    names = ["a", None, "b", "a"]
    with dt.route(model, names):
        routed = _out(model, x)
    for i, n in enumerate(names):
        if n is None:
            with dt.disabled(model):
                alone = _out(model, x[i:i + 1])
        else:
            dt.set_active(model, [n])
            alone = _out(model, x[i:i + 1])
        assert torch.allclose(routed[i], alone[0], rtol=1e-6, atol=1e-5), (i, n)


@pytest.mark.parametrize("method", sorted(SPECS))
@pytest.mark.parametrize("fmt", ["deltatune", "peft"])
def test_save_load_round_trip(tmp_path, method, fmt):
    base = _base(_llama)
    model = copy.deepcopy(base)
    spec = SPECS[method](r=2, alpha=3.0, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 1},
                         trainable_modules=["lm_head"])
    dt.attach(model, spec, name="x")
    randomize(model)
    y = _out(model, _TOK)
    dt.save_adapter(model, tmp_path, name="x", format=fmt)
    again = copy.deepcopy(base)
    name = dt.load_adapter(again, tmp_path)
    loaded = dt.get_spec(again, name)
    if fmt == "peft":  # peft's config lists the adapted modules by path
        assert len(loaded.targets) == 4 and all(t.endswith(spec.targets) for t in loaded.targets)
        loaded = loaded.replace(targets=spec.targets)
    assert loaded == spec
    assert torch.equal(_out(again, _TOK), y)


def test_half_precision_base_gets_float32_factors():
    model = _base(_llama).half()
    dt.attach(model, dt.LoKr(r=1, targets=["q_proj"]))
    dt.attach(model, dt.LoHa(r=2, targets=["v_proj"]), name="h", activate=False)
    params = [p for n, p in model.named_parameters() if "deltas" in n]
    assert params and all(p.dtype == torch.float32 for p in params)
    dt.set_active(model, ["default", "h"])
    randomize(model, std=0.05)
    assert torch.isfinite(_out(model, _TOK).float()).all()


def test_dropouts_train_and_leave_eval_untouched():
    model = _base(Conv1dNet)
    dt.attach(model, dt.LoKr(r=1, rank_dropout=0.5, rank_dropout_scale=True, targets=_C1D))
    dt.attach(model, dt.LoHa(r=2, rank_dropout=0.5, module_dropout=0.5, targets=_C1D), name="h")
    dt.set_active(model, ["default", "h"])
    # a second delta on an existing host starts in the model's (eval) mode too
    assert not any(m.training for m in model.modules())
    randomize(model)
    y = _out(model, _SEQ)
    model.train()
    torch.manual_seed(3)
    outs = []
    for _ in range(4):
        out = model(_SEQ)
        out.sum().backward()
        outs.append(out.detach())
    assert all(torch.isfinite(o).all() for o in outs) and not torch.equal(outs[0], y)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    assert torch.equal(_out(model, _SEQ), y)


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "typo", "meant"), [
    (dt.LoHa, "rnak_pattern", "rank_pattern"),
    (dt.LoHa, "use_effective_conv", "use_effective_conv2d"),
    (dt.LoKr, "decompose_facter", "decompose_factor"),
    (dt.LoKr, "rank_dropout_scaled", "rank_dropout_scale"),
])
def test_misspelt_option_names_the_closest(cls, typo, meant):
    with pytest.raises(SpecError, match=f"no option '{typo}'; did you mean {meant}"):
        cls(**{typo: 1})


@pytest.mark.parametrize("cls", [dt.LoHa, dt.LoKr])
def test_a_kind_it_cannot_host_is_named(cls):
    model = _base(_llama)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(TargetError, match=r"cannot host 'model\.embed_tokens' \(Embedding, a "
                       r"embedding module\): it hosts nn\.Linear, nn\.Conv1d or nn\.Conv2d"):
        dt.attach(model, cls(targets=["embed_tokens", "q_proj"]))
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)
    with pytest.raises(TargetError, match=r"\(Conv1D, a linear module\): it hosts nn\.Linear"):
        dt.attach(transformers.GPT2Model(config), cls(targets=["c_attn"]))
    # nothing left behind: no host, no parameter, no value changed
    assert not dt.delta_names(model) and not list(iter_hosts(model))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_loha_rank_above_the_layer_is_refused_before_building():
    model = _base(SmallCNN)
    with pytest.raises(SpecError, match=r"LoHa\.rank_pattern: rank 20 on 'pw' exceeds that "
                       r"layer's limit 8"):
        dt.attach(model, dt.LoHa(r=2, targets=_CNN, rank_pattern={"pw": 20}))
    assert not dt.delta_names(model)


@pytest.mark.parametrize("method", sorted(SPECS))
def test_peft_options_deltatune_lacks_are_refused(tmp_path, method):
    model = _base(_bert)
    dt.attach(model, SPECS[method](r=2, targets=["query"]))
    dt.save_adapter(model, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["layers_to_transform"] = [0]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(DeltaFileError, match="layers_to_transform"):
        dt.load_adapter(_base(_bert), tmp_path)
