"""HiRA and WaveFT: numeric parity with the real peft 0.21.2 in both directions, exact merge and
unmerge, per-sample routing, both file formats, and bad input.

The parity tests print the max |output difference| they measure (``pytest -s`` shows them).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core import DeltaHost, Host
from deltatune.methods import hira as hira_mod
from deltatune.methods import waveft as waveft_mod

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from test_peft_parity import _bert, _gpt2, _llama  # tiny models built from configs  # noqa: E402
from tiny_transformers import dt_to_peft, peft_to_dt  # noqa: E402
from tiny_transformers import model_out as _out  # noqa: E402
from tiny_transformers import scramble as _scramble  # noqa: E402

IDS = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (model, deltatune spec, the same adapter as a peft config, std of the random adapter values)
PARITY = {
    "bert-hira": (
        _bert,
        lambda: dt.HiRA(r=4, targets=("query", "value", "output.dense")),
        lambda: peft.HiraConfig(r=4, target_modules=["query", "value", "output.dense"]),
        0.3,
    ),
    "llama-hira-gaussian": (
        _llama,
        lambda: dt.HiRA(r=2, init="gaussian", targets=("q_proj", "v_proj", "up_proj")),
        lambda: peft.HiraConfig(
            r=2, init_weights="gaussian", target_modules=["q_proj", "v_proj", "up_proj"]
        ),
        0.3,
    ),
    "gpt2-hira-conv1d": (
        _gpt2,
        lambda: dt.HiRA(r=2, targets=("c_attn", "mlp.c_proj")),
        lambda: peft.HiraConfig(r=2, fan_in_fan_out=True, target_modules=["c_attn", "mlp.c_proj"]),
        0.3,
    ),
    "bert-waveft": (
        _bert,
        lambda: dt.WaveFT(n_frequency=60, scaling=20.0, targets=("query", "value", "output.dense")),
        lambda: peft.WaveFTConfig(
            n_frequency=60, scaling=20.0, target_modules=["query", "value", "output.dense"]
        ),
        1.0,
    ),
    "llama-waveft-db3-pattern": (
        _llama,
        lambda: dt.WaveFT(
            n_frequency=50,
            scaling=10.0,
            wavelet_family="db3",
            random_loc_seed=5,
            n_frequency_pattern={"layers.0.mlp.down_proj": 200, "v_proj": 16},
            targets=("q_proj", "v_proj", "down_proj"),
        ),
        lambda: peft.WaveFTConfig(
            n_frequency=50,
            scaling=10.0,
            wavelet_family="db3",
            random_loc_seed=5,
            target_modules=["q_proj", "v_proj", "down_proj"],
            n_frequency_pattern={"layers.0.mlp.down_proj": 200, "v_proj": 16},
        ),
        1.0,
    ),
    "llama-waveft-proportional": (
        _llama,
        lambda: dt.WaveFT(
            n_frequency=40,
            scaling=10.0,
            wavelet_family="db2",
            proportional_parameters=True,
            targets=("q_proj", "down_proj"),
        ),
        lambda: peft.WaveFTConfig(
            n_frequency=40,
            scaling=10.0,
            wavelet_family="db2",
            proportional_parameters=True,
            target_modules=["q_proj", "down_proj"],
        ),
        1.0,
    ),
    "bert-waveft-no-idwt": (
        _bert,
        lambda: dt.WaveFT(n_frequency=40, scaling=5.0, use_idwt=False, targets=("query", "value")),
        lambda: peft.WaveFTConfig(
            n_frequency=40, scaling=5.0, use_idwt=False, target_modules=["query", "value"]
        ),
        1.0,
    ),
    "gpt2-waveft-conv1d": (
        _gpt2,
        lambda: dt.WaveFT(
            n_frequency=80, scaling=20.0, wavelet_family="db4", targets=("c_attn", "mlp.c_proj")
        ),
        lambda: peft.WaveFTConfig(
            n_frequency=80,
            scaling=20.0,
            wavelet_family="db4",
            fan_in_fan_out=True,
            target_modules=["c_attn", "mlp.c_proj"],
        ),
        1.0,
    ),
}


@pytest.mark.parametrize("case", sorted(PARITY))
def test_peft_parity_both_directions(tmp_path, case):
    make, spec, config, std = PARITY[case]
    ours_in_peft = dt_to_peft(tmp_path / "a", make, IDS, spec(), std)
    peft_in_ours = peft_to_dt(tmp_path / "b", make, IDS, config(), std)
    print(f"\n{case}: deltatune -> peft max|diff| {ours_in_peft:.2e}, "
          f"peft -> deltatune max|diff| {peft_in_ours:.2e}")
    assert ours_in_peft <= 1e-5 and peft_in_ours <= 1e-5, (ours_in_peft, peft_in_ours)


def test_hira_change_is_the_hadamard_product_with_the_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    dt.attach(model, dt.HiRA(r=2, targets=("0",)))
    _scramble(model)
    delta, w = model[0].deltas["default"], model[0].base.weight.detach()
    want = w * (delta.hira_B @ delta.hira_A).detach()
    assert torch.allclose(delta.delta_weight(model[0])["weight"], want, atol=1e-6)
    assert torch.linalg.matrix_rank(want) == 5  # high rank from a rank-2 mask
    assert delta.factors(model[0]) is None


def test_daubechies_filters_are_peft_s_and_positions_shared_by_shape():
    from peft.tuners.waveft.wavelet import Wavelet
    for n in range(1, 11):
        ref = torch.tensor(Wavelet(f"db{n}").rec_lo, dtype=torch.float64)
        assert torch.allclose(torch.tensor(waveft_mod.daubechies(n), dtype=torch.float64), ref,
                              atol=1e-10)
    model = _bert()
    dt.attach(model, dt.WaveFT(n_frequency=30, random_loc_seed=11, targets=("query", "value")))
    hosts = [m for m in model.modules() if isinstance(m, DeltaHost)]
    first = hosts[0].deltas["default"].indices
    assert all(h.deltas["default"].indices is first for h in hosts)  # one tensor, 4 layers
    assert set(hosts[0].deltas["default"].state_dict()) == {"waveft_spectrum"}


SPECS = {
    "hira": (lambda: dt.HiRA(r=3, targets=("query", "dense")), 0.3),
    "waveft": (lambda: dt.WaveFT(n_frequency=40, scaling=5.0, wavelet_family="db2",
                                 targets=("query", "dense")), 1.0),
}


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_merge_unmerge_exact(kind):
    spec, std = SPECS[kind]
    torch.manual_seed(0)
    model = _bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dt.attach(model, spec())
    _scramble(model, std=std)
    y = _out(model, IDS)
    dt.merge(model)
    assert (_out(model, IDS) - y).abs().max() <= 1e-5
    dt.unmerge(model)
    assert (_out(model, IDS) - y).abs().max() <= 1e-5
    dt.detach(model)
    after = model.state_dict()
    assert max((after[k] - v).abs().max().item() for k, v in before.items()) <= 1e-6


def test_hira_merge_refuses_a_mask_it_could_not_undo():
    model = nn.Sequential(nn.Linear(3, 2))
    dt.attach(model, dt.HiRA(r=1, targets=("0",)))
    with torch.no_grad():
        delta = model[0].deltas["default"]
        delta.hira_A.fill_(1.0)
        delta.hira_B.fill_(-1.0)  # 1 + BA = 0 everywhere
    w = model[0].base.weight.detach().clone()
    with pytest.raises(dt.StateError, match="cannot be merged exactly"):
        dt.merge(model)
    assert torch.equal(model[0].base.weight, w)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_routing_equals_each_sample_alone(kind):
    spec, std = SPECS[kind]
    torch.manual_seed(0)
    model = _bert()
    dt.attach(model, spec(), name="a")
    _scramble(model, seed=3, std=std)
    dt.attach(model, spec(), name="b")
    _scramble(model, seed=4, std=std)  # attach froze "a": only "b" moves now
    names = ["a", None, "b"]
    with dt.route(model, names):
        mixed = _out(model, IDS)
    for i, name in enumerate(names):
        if name is None:
            with dt.disabled(model):
                alone = _out(model, IDS[i:i + 1])
        else:
            dt.set_active(model, [name])
            alone = _out(model, IDS[i:i + 1])
        assert (mixed[i:i + 1] - alone).abs().max() <= 1e-5, (i, name)


@pytest.mark.parametrize("kind", sorted(SPECS))
@pytest.mark.parametrize("fmt", ["deltatune", "peft"])
def test_save_load_round_trip(tmp_path, kind, fmt):
    spec, std = SPECS[kind]
    torch.manual_seed(0)
    base = _bert()
    model = copy.deepcopy(base)
    dt.attach(model, spec())
    _scramble(model, std=std)
    y = _out(model, IDS)
    dt.save_adapter(model, tmp_path / "d", format=fmt)
    again = copy.deepcopy(base)
    dt.load_adapter(again, tmp_path / "d")
    diff = (_out(again, IDS) - y).abs().max().item()
    assert diff == 0.0 if fmt == "deltatune" else diff <= 1e-6
    if fmt == "deltatune":
        assert dt.get_spec(again, "default") == dt.get_spec(model, "default")


def test_half_precision_base_gets_float32_deltas():
    for spec in (dt.WaveFT(n_frequency=20, scaling=1.0, targets=("0",)),
                 dt.HiRA(r=2, targets=("0",))):
        torch.manual_seed(0)
        ref = nn.Sequential(nn.Linear(8, 6))
        half = copy.deepcopy(ref).to(torch.bfloat16)
        x = torch.randn(4, 8)
        for m in (ref, half):
            dt.attach(m, spec)
            _scramble(m, std=0.3)
        assert all(p.dtype == torch.float32 for p in half.parameters() if p.requires_grad)
        y = half(x.to(torch.bfloat16))
        assert y.dtype == torch.bfloat16
        assert (y.float() - ref(x)).abs().max() <= 0.1


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, typo, closest", [
    (dt.HiRA, "rank", "r"), (dt.HiRA, "hira_dropout", "dropout"),
    (dt.HiRA, "rank_patern", "rank_pattern"), (dt.WaveFT, "n_frequencies", "n_frequency"),
    (dt.WaveFT, "wavelet", "wavelet_family"), (dt.WaveFT, "use_idw", "use_idwt"),
])
def test_misspelt_option_names_the_closest(cls, typo, closest):
    with pytest.raises(dt.SpecError, match=f"no option '{typo}'") as err:
        cls(**{typo: 1})
    assert closest in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec, module, kind", [
    (lambda: dt.HiRA(r=2, targets=("0",)), nn.Conv2d(3, 4, 3), "Conv2d"),
    (lambda: dt.HiRA(r=2, targets=("0",)), nn.Embedding(10, 4), "Embedding"),
    (lambda: dt.WaveFT(n_frequency=2, targets=("0",)), nn.Conv2d(3, 4, 3), "Conv2d"),
    (lambda: dt.WaveFT(n_frequency=2, targets=("0",)), nn.LayerNorm(4), "LayerNorm"),
])
def test_unhostable_module_names_its_kind_and_the_hostable_ones(spec, module, kind):
    model = nn.Sequential(module)
    s = spec()
    with pytest.raises(dt.TargetError) as err:
        dt.attach(model, s)
    msg = str(err.value)
    assert kind in msg and s.host_what in msg, msg
    assert model[0] is module and not any(isinstance(m, Host) for m in model.modules())


def test_sizes_are_checked_before_anything_is_built():
    layers = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model = nn.Sequential(layers)
    with pytest.raises(dt.SpecError, match=r"n_frequency=2592 gives '0.0' 2592 .*at most 12"):
        dt.attach(model, dt.WaveFT(targets=("0.0", "0.1")))
    with pytest.raises(dt.SpecError, match=r"n_frequency_pattern=.*'0.1' 9 .*at most 6"):
        dt.attach(model, dt.WaveFT(n_frequency=2, n_frequency_pattern={"1": 9},
                                   targets=("0.0", "0.1")))
    with pytest.raises(dt.SpecError, match=r"HiRA.r=3 gives rank 3 on '0.1'.*rank <= 2"):
        dt.attach(model, dt.HiRA(r=3, targets=("0.0", "0.1")))
    assert all(type(m) is nn.Linear for m in layers) and model[0] is layers
    with pytest.raises(dt.SpecError, match="wavelet_family.*symlets"):
        dt.WaveFT(wavelet_family="sym4")


def test_peft_files_deltatune_cannot_express_are_refused(tmp_path):
    model = _llama()  # peft 0.21.2's HiRA builds every layer at rank r: refuse, don't mislead
    dt.attach(model, dt.HiRA(r=2, rank_pattern={"v_proj": 3}, targets=("q_proj", "v_proj")))
    assert model.model.layers[0].self_attn.v_proj.deltas["default"].hira_A.shape == (3, 32)
    with pytest.raises(dt.DeltaFileError, match="ignores rank_pattern.*format='deltatune'"):
        dt.save_adapter(model, tmp_path / "pattern", format="peft")
    pm = peft.get_peft_model(_bert(), peft.WaveFTConfig(n_frequency=8, wavelet_family="sym2",
                                                        target_modules=["query"]))
    pm.save_pretrained(tmp_path / "sym")
    with pytest.raises(dt.DeltaFileError, match="wavelet_family='sym2' is not supported"):
        dt.load_adapter(_bert(), tmp_path / "sym")
    pm = peft.get_peft_model(_bert(), peft.HiraConfig(r=2, layers_to_transform=[0],
                                                      target_modules=["query"]))
    pm.save_pretrained(tmp_path / "layers")
    with pytest.raises(dt.DeltaFileError, match=r"layers_to_transform=\[0\] is not supported"):
        dt.load_adapter(_bert(), tmp_path / "layers")


def test_module_docstrings_carry_the_paper():
    assert "openreview.net/forum?id=TwJrTz9cRS" in hira_mod.__doc__
    assert "arxiv.org/abs/2505.12532" in waveft_mod.__doc__
