"""FourierFT and HRA: numeric parity with the real peft 0.21.2 in both directions, exact merge and
unmerge, per-sample routing, both file formats, and bad input.

The parity tests print the max |output difference| they measure (``pytest -s`` shows them).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SmallCNN
from torch import nn

import deltatune as dt
from deltatune.core import DeltaHost, Host
from deltatune.methods import fourierft as fft_mod
from deltatune.methods import hra as hra_mod

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from test_peft_parity import _bert, _gpt2, _llama  # tiny models built from configs  # noqa: E402
from tiny_transformers import dt_to_peft, peft_to_dt  # noqa: E402
from tiny_transformers import model_out as _out  # noqa: E402
from tiny_transformers import scramble as _scramble  # noqa: E402

IDS = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(0))
IMAGES = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (model, inputs, deltatune spec, the same adapter as a peft config)
PARITY = {
    "bert-fourierft": (_bert, IDS, lambda: dt.FourierFT(
        n_frequency=60, scaling=40.0, targets=("query", "value", "output.dense")),
        lambda: peft.FourierFTConfig(n_frequency=60, scaling=40.0,
                                     target_modules=["query", "value", "output.dense"])),
    "llama-fourierft-pattern": (_llama, IDS, lambda: dt.FourierFT(
        n_frequency=50, scaling=30.0, random_loc_seed=5, targets=("q_proj", "v_proj", "down_proj"),
        n_frequency_pattern={"layers.0.mlp.down_proj": 200, "v_proj": 16}),
        lambda: peft.FourierFTConfig(n_frequency=50, scaling=30.0, random_loc_seed=5,
                                     target_modules=["q_proj", "v_proj", "down_proj"],
                                     n_frequency_pattern={"layers.0.mlp.down_proj": 200,
                                                          "v_proj": 16})),
    "gpt2-fourierft-conv1d": (_gpt2, IDS, lambda: dt.FourierFT(
        n_frequency=80, scaling=40.0, targets=("c_attn", "mlp.c_proj")),
        lambda: peft.FourierFTConfig(n_frequency=80, scaling=40.0, fan_in_fan_out=True,
                                     target_modules=["c_attn", "mlp.c_proj"])),
    "bert-hra": (_bert, IDS, lambda: dt.HRA(r=4, targets=("query", "value", "dense")),
                 lambda: peft.HRAConfig(r=4, target_modules=["query", "value", "dense"],
                                        init_weights=False)),
    "llama-hra-odd-r": (_llama, IDS, lambda: dt.HRA(r=3, init="random",
                                                    targets=("q_proj", "o_proj", "up_proj")),
                        lambda: peft.HRAConfig(r=3, target_modules=["q_proj", "o_proj", "up_proj"],
                                               init_weights=False)),
    "bert-hra-gram-schmidt": (_bert, IDS, lambda: dt.HRA(
        r=4, gram_schmidt=True, init="random", targets=("query", "value")),
        lambda: peft.HRAConfig(r=4, apply_GS=True, init_weights=False,
                               target_modules=["query", "value"])),
    "cnn-hra-conv2d": (SmallCNN, IMAGES, lambda: dt.HRA(r=4, targets=("conv1", "conv2", "pw")),
                       lambda: peft.HRAConfig(r=4, target_modules=["conv1", "conv2", "pw"],
                                              init_weights=False)),
}
MEASURED: dict[str, tuple[float, float]] = {}


@pytest.mark.parametrize("case", sorted(PARITY))
def test_peft_parity_both_directions(tmp_path, case):
    make, inputs, spec, config = PARITY[case]
    ours_in_peft = dt_to_peft(tmp_path / "a", make, inputs, spec())
    peft_in_ours = peft_to_dt(tmp_path / "b", make, inputs, config())
    MEASURED[case] = (ours_in_peft, peft_in_ours)
    print(f"\n{case}: deltatune -> peft max|diff| {ours_in_peft:.2e}, "
          f"peft -> deltatune max|diff| {peft_in_ours:.2e}")
    assert ours_in_peft <= 1e-5 and peft_in_ours <= 1e-5, (ours_in_peft, peft_in_ours)


def test_fourierft_positions_are_peft_s_and_shared_by_shape():
    """The positions come from the seed as peft draws them, once per layer shape per attach."""
    model = _bert()
    dt.attach(model, dt.FourierFT(n_frequency=30, random_loc_seed=11, targets=("query", "value")))
    hosts = [m for m in model.modules() if isinstance(m, DeltaHost)]
    first = hosts[0].deltas["default"].indices
    assert all(h.deltas["default"].indices is first for h in hosts)  # one tensor, 4 layers
    pm = peft.get_peft_model(_bert(), peft.FourierFTConfig(n_frequency=30, random_loc_seed=11,
                                                           target_modules=["query"]))
    layer = pm.base_model.model.encoder.layer[0].attention.self.query
    assert torch.equal(layer.indices["default"], first)
    # indices are rebuilt from the seed, never saved
    assert set(hosts[0].deltas["default"].state_dict()) == {"fourierft_spectrum"}


def test_fourierft_weight_is_the_inverse_dft_of_the_sparse_spectrum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    dt.attach(model, dt.FourierFT(n_frequency=5, scaling=3.0, targets=("0",)))
    delta = model[0].deltas["default"]
    _scramble(model)
    dense = torch.zeros(4, 6, dtype=torch.complex64)
    values = delta.fourierft_spectrum.detach().to(torch.complex64)
    dense[delta.indices[0], delta.indices[1]] = values
    want = torch.fft.ifft2(dense).real * 3.0
    assert torch.allclose(delta.delta_weight(model[0])["weight"], want, atol=1e-6)


def test_hra_is_orthogonal_and_symmetric_init_is_the_identity():
    model = nn.Sequential(nn.Linear(12, 20))
    dt.attach(model, dt.HRA(r=6, targets=("0",)))
    delta = model[0].deltas["default"]
    eye = torch.eye(12)
    assert torch.allclose(delta.reflect(eye), eye, atol=1e-6)  # equal pairs cancel
    _scramble(model)
    h = delta.reflect(eye).detach()
    assert torch.allclose(h @ h.t(), eye, atol=1e-5)
    assert torch.allclose(delta.reflect(h, inverse=True), eye, atol=1e-5)
    q = hra_mod.gram_schmidt(torch.randn(12, 4))
    assert torch.allclose(q.t() @ q, torch.eye(4), atol=1e-5)


SPECS = {
    "fourierft": lambda: dt.FourierFT(n_frequency=40, scaling=20.0, targets=("query", "dense")),
    "hra": lambda: dt.HRA(r=4, targets=("query", "dense")),
    "hra-gs": lambda: dt.HRA(r=4, gram_schmidt=True, init="random", targets=("value",)),
}


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_merge_unmerge_exact(kind):
    torch.manual_seed(0)
    model = _bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dt.attach(model, SPECS[kind]())
    _scramble(model)
    y = _out(model, IDS)
    dt.merge(model)
    assert (_out(model, IDS) - y).abs().max() <= 1e-5
    dt.unmerge(model)
    assert (_out(model, IDS) - y).abs().max() <= 1e-5
    dt.detach(model)
    after = model.state_dict()
    assert max((after[k] - v).abs().max().item() for k, v in before.items()) <= 1e-6


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_routing_equals_each_sample_alone(kind):
    torch.manual_seed(0)
    model = _bert()
    dt.attach(model, SPECS[kind](), name="a")
    _scramble(model, seed=3)
    dt.attach(model, SPECS[kind](), name="b")
    _scramble(model, seed=4)  # attach froze "a": only "b" moves now
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
    torch.manual_seed(0)
    base = _bert()
    model = copy.deepcopy(base)
    dt.attach(model, SPECS[kind]())
    _scramble(model)
    y = _out(model, IDS)
    dt.save_adapter(model, tmp_path / "d", format=fmt)
    again = copy.deepcopy(base)
    dt.load_adapter(again, tmp_path / "d")
    diff = (_out(again, IDS) - y).abs().max().item()
    assert diff == 0.0 if fmt == "deltatune" else diff <= 1e-6
    if fmt == "deltatune":
        assert dt.get_spec(again, "default") == dt.get_spec(model, "default")


def test_half_precision_base_gets_float32_deltas():
    for spec in (dt.FourierFT(n_frequency=20, scaling=5.0, targets=("0",)),
                 dt.HRA(r=2, targets=("0",))):
        torch.manual_seed(0)
        ref = nn.Sequential(nn.Linear(8, 6))
        half = copy.deepcopy(ref).to(torch.bfloat16)
        x = torch.randn(4, 8)
        for m in (ref, half):
            dt.attach(m, spec)
            _scramble(m)
        assert all(p.dtype == torch.float32 for p in half.parameters() if p.requires_grad)
        y = half(x.to(torch.bfloat16))
        assert y.dtype == torch.bfloat16
        assert (y.float() - ref(x)).abs().max() <= 0.1


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, typo, closest", [
    (dt.FourierFT, "n_frequencies", "n_frequency"),
    (dt.FourierFT, "random_seed", "random_loc_seed"),
    (dt.FourierFT, "scale", "scaling"), (dt.HRA, "rank", "r"), (dt.HRA, "apply_gs", "gram_schmidt"),
    (dt.HRA, "gram_schmit", "gram_schmidt"),
])
def test_misspelt_option_names_the_closest(cls, typo, closest):
    with pytest.raises(dt.SpecError, match=f"no option '{typo}'") as err:
        cls(**{typo: 1})
    assert closest in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec, module, kind", [
    (lambda: dt.FourierFT(targets=("0",)), nn.Conv2d(3, 4, 3), "Conv2d"),
    (lambda: dt.FourierFT(targets=("0",)), nn.Embedding(10, 4), "Embedding"),
    (lambda: dt.HRA(r=2, targets=("0",)), nn.Embedding(10, 4), "Embedding"),
    (lambda: dt.HRA(r=2, targets=("0",)), nn.LayerNorm(4), "LayerNorm"),
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
    with pytest.raises(dt.SpecError, match=r"n_frequency=1000 gives '0.0' 1000 .*at most 12"):
        dt.attach(model, dt.FourierFT(targets=("0.0", "0.1")))
    # a pattern key matches the end of a path after a dot, as in peft
    with pytest.raises(dt.SpecError, match=r"n_frequency_pattern=.*'0.1' 9 .*at most 6"):
        dt.attach(model, dt.FourierFT(n_frequency=2, n_frequency_pattern={"1": 9},
                                      targets=("0.0", "0.1")))
    with pytest.raises(dt.SpecError, match=r"HRA.r=4 exceeds the 3 input features of '0.1'"):
        dt.attach(model, dt.HRA(r=4, targets=("0.0", "0.1")))
    assert all(type(m) is nn.Linear for m in layers) and model[0] is layers
    with pytest.raises(dt.SpecError, match="n_frequency_pattern"):
        dt.FourierFT(n_frequency_pattern={"q(": 3})


def test_peft_files_deltatune_cannot_express_are_refused(tmp_path):
    model = _gpt2()
    dt.attach(model, dt.HRA(r=2, targets=("c_attn",)))  # deltatune hosts Conv1D, peft's HRA not
    with pytest.raises(dt.DeltaFileError, match="GPT-2 Conv1D.*format='deltatune'"):
        dt.save_adapter(model, tmp_path / "hra", format="peft")
    pm = peft.get_peft_model(_bert(), peft.FourierFTConfig(n_frequency=8, bias="all",
                                                           target_modules=["query"]))
    pm.save_pretrained(tmp_path / "bias")
    with pytest.raises(dt.DeltaFileError, match="bias='all' is not supported"):
        dt.load_adapter(_bert(), tmp_path / "bias")


def test_module_docstrings_carry_the_paper():
    assert "arxiv.org/abs/2405.03003" in fft_mod.__doc__
    assert "arxiv.org/abs/2405.17484" in hra_mod.__doc__
