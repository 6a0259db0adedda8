"""SHiRA and VB-LoRA: numeric parity with the real peft 0.21.2 in both directions, exact merge and
unmerge, per-sample routing, both file formats, the shared vector bank, and bad input.

The parity tests print the max |output difference| they measure (``pytest -s`` shows them).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core import DeltaHost, Host
from deltatune.methods import shira as shira_mod
from deltatune.methods import vblora as vblora_mod

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from test_methods_spectral import IDS, _out, _scramble, dt_to_peft, peft_to_dt  # noqa: E402
from test_peft_parity import _bert, _gpt2, _llama  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


BERT_VB = ("query", "value", "attention.output.dense")  # BERT's FFN (37 wide) has no common tile
# (model, inputs, deltatune spec, the same adapter as a peft config)
PARITY = {
    "bert-shira": (_bert, lambda: dt.SHiRA(r=2, targets=("query", "value", "dense")),
                   lambda: peft.ShiraConfig(r=2, target_modules=["query", "value", "dense"],
                                            init_weights=False)),
    "llama-shira-seeded": (_llama, lambda: dt.SHiRA(
        r=3, random_seed=7, targets=("q_proj", "o_proj", "down_proj")),
        lambda: peft.ShiraConfig(r=3, random_seed=7, init_weights=False,
                                 target_modules=["q_proj", "o_proj", "down_proj"])),
    "bert-vblora": (_bert, lambda: dt.VBLoRA(r=2, num_vectors=8, vector_length=8, topk=3,
                                             targets=BERT_VB),
                    lambda: peft.VBLoRAConfig(r=2, num_vectors=8, vector_length=8, topk=3,
                                              target_modules=list(BERT_VB))),
    "bert-vblora-topk-file": (_bert, lambda: dt.VBLoRA(
        r=2, num_vectors=8, vector_length=8, topk=3, save_only_topk_weights=True,
        targets=BERT_VB),
        lambda: peft.VBLoRAConfig(r=2, num_vectors=8, vector_length=8, topk=3,
                                  save_only_topk_weights=True, target_modules=list(BERT_VB))),
    "llama-vblora": (_llama, lambda: dt.VBLoRA(r=4, num_vectors=16, vector_length=8,
                                               targets=("q_proj", "v_proj", "up_proj")),
                     lambda: peft.VBLoRAConfig(r=4, num_vectors=16, vector_length=8,
                                               target_modules=["q_proj", "v_proj", "up_proj"])),
    "gpt2-vblora-conv1d": (_gpt2, lambda: dt.VBLoRA(r=2, num_vectors=8, vector_length=8,
                                                    targets=("c_attn", "mlp.c_proj")),
                           lambda: peft.VBLoRAConfig(r=2, num_vectors=8, vector_length=8,
                                                     fan_in_fan_out=True,
                                                     target_modules=["c_attn", "mlp.c_proj"])),
}


@pytest.mark.parametrize("case", sorted(PARITY))
def test_peft_parity_both_directions(tmp_path, case):
    make, spec, config = PARITY[case]
    ours_in_peft = dt_to_peft(tmp_path / "a", make, IDS, spec())
    peft_in_ours = peft_to_dt(tmp_path / "b", make, IDS, config())
    print(f"\n{case}: deltatune -> peft max|diff| {ours_in_peft:.2e}, "
          f"peft -> deltatune max|diff| {peft_in_ours:.2e}")
    assert ours_in_peft <= 1e-5 and peft_in_ours <= 1e-5, (ours_in_peft, peft_in_ours)


def test_shira_positions_are_peft_s_and_saved():
    model = _bert()
    dt.attach(model, dt.SHiRA(r=2, random_seed=4, targets=("query",)))
    pm = peft.get_peft_model(_bert(), peft.ShiraConfig(r=2, random_seed=4,
                                                       target_modules=["query"]))
    ours = model.encoder.layer[1].attention.self.query.deltas["default"]
    theirs = pm.base_model.model.encoder.layer[1].attention.self.query.shira_indices["default"]
    assert torch.equal(ours.shira_indices, theirs.long())
    assert ours.shira_indices.shape == (2, 2 * (32 + 32))
    assert set(ours.state_dict()) == {"shira_weight", "shira_indices"}
    # sparse and high-rank: r·(out+in) entries change, and the rank can exceed r
    _scramble(model)
    w = ours.delta_weight(model.encoder.layer[1].attention.self.query)["weight"]
    assert int((w != 0).sum()) == 128 and torch.linalg.matrix_rank(w) > 2
    assert ours.factors(model.encoder.layer[1].attention.self.query) is None


def test_vblora_bank_is_one_module_shared_by_every_layer(tmp_path):
    torch.manual_seed(0)
    base = _llama()
    model = copy.deepcopy(base)
    dt.attach(model, dt.VBLoRA(r=2, num_vectors=8, vector_length=8, targets=("q_proj", "v_proj")))
    deltas = [m.deltas["default"] for m in model.modules() if isinstance(m, DeltaHost)]
    assert len(deltas) == 4 and all(d.bank is deltas[0].bank for d in deltas)
    bank = deltas[0].bank.vblora_vector_bank
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p is bank for p in trainable) == 1  # registered once as a parameter of the model
    _scramble(model)
    y = _out(model, IDS)
    dt.save_adapter(model, tmp_path / "d")
    again = copy.deepcopy(base)
    dt.load_adapter(again, tmp_path / "d")
    loaded = [m.deltas["default"] for m in again.modules() if isinstance(m, DeltaHost)]
    assert all(d.bank is loaded[0].bank for d in loaded)  # shared again after loading
    assert torch.equal(_out(again, IDS), y)
    copied = copy.deepcopy(again)  # deep copies keep the sharing, independently
    kept = [m.deltas["default"] for m in copied.modules() if isinstance(m, DeltaHost)]
    assert all(d.bank is kept[0].bank for d in kept) and kept[0].bank is not loaded[0].bank
    # exactly rank r: the factors rebuild the weight change
    host = next(m for m in again.modules() if isinstance(m, DeltaHost))
    (f,) = loaded[0].factors(host)
    assert torch.allclose(f.B @ f.A, loaded[0].delta_weight(host)["weight"], atol=1e-6)
    assert torch.linalg.matrix_rank(f.B @ f.A) <= 2


def test_vblora_topk_file_keeps_the_selection():
    """A save_only_topk_weights file is read back as finite logits choosing the same vectors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16))
    dt.attach(model, dt.VBLoRA(r=2, num_vectors=6, vector_length=4, topk=3,
                               save_only_topk_weights=True, targets=("0",)))
    delta = model[0].deltas["default"]
    _scramble(model)
    layout = dt.VBLoRA.peft
    saved = layout.save(delta, model[0])
    assert saved["vblora_logits_A_topk_indices"].dtype == torch.uint8
    (bank,) = layout.shared_keys
    back = layout.load(delta, model[0], {**saved, bank: delta.bank.vblora_vector_bank})
    for key in ("vblora_logits_A", "vblora_logits_B"):
        assert torch.isfinite(back[key]).all()
        assert torch.allclose(delta._mix(back[key]), delta._mix(getattr(delta, key)), atol=1e-6)


SPECS = {
    "shira": lambda: dt.SHiRA(r=2, targets=("query", "dense")),
    "vblora": lambda: dt.VBLoRA(r=2, num_vectors=8, vector_length=8, targets=BERT_VB),
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
    for spec in (dt.SHiRA(r=1, random_seed=0, targets=("0",)),
                 dt.VBLoRA(r=2, num_vectors=4, vector_length=2, targets=("0",))):
        ref = nn.Sequential(nn.Linear(8, 6))
        half = copy.deepcopy(ref).to(torch.bfloat16)
        x = torch.randn(4, 8)
        for m in (ref, half):
            torch.manual_seed(0)
            dt.attach(m, spec)
            _scramble(m)
        assert all(p.dtype == torch.float32 for p in half.parameters() if p.requires_grad)
        y = half(x.to(torch.bfloat16))
        assert y.dtype == torch.bfloat16
        assert (y.float() - ref(x)).abs().max() <= 0.1


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, typo, closest", [
    (dt.SHiRA, "rank", "r"), (dt.SHiRA, "random_sed", "random_seed"),
    (dt.SHiRA, "mask", "mask_type"), (dt.VBLoRA, "num_vector", "num_vectors"),
    (dt.VBLoRA, "top_k", "topk"), (dt.VBLoRA, "vblora_dropout", "dropout"),
    (dt.VBLoRA, "save_only_topk_weight", "save_only_topk_weights"),
])
def test_misspelt_option_names_the_closest(cls, typo, closest):
    with pytest.raises(dt.SpecError, match=f"no option '{typo}'") as err:
        cls(**{typo: 1})
    assert closest in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec, module, kind", [
    (lambda: dt.SHiRA(r=1, targets=("0",)), nn.Conv2d(3, 4, 3), "Conv2d"),
    (lambda: dt.SHiRA(r=1, targets=("0",)), nn.Embedding(10, 4), "Embedding"),
    (lambda: dt.VBLoRA(vector_length=2, targets=("0",)), nn.Embedding(10, 4), "Embedding"),
    (lambda: dt.VBLoRA(vector_length=2, targets=("0",)), nn.LayerNorm(4), "LayerNorm"),
])
def test_unhostable_module_names_its_kind_and_the_hostable_ones(spec, module, kind):
    model = nn.Sequential(module)
    s = spec()
    with pytest.raises(dt.TargetError) as err:
        dt.attach(model, s)
    msg = str(err.value)
    assert kind in msg and s.host_what in msg, msg
    assert model[0] is module and not any(isinstance(m, Host) for m in model.modules())


def test_shira_refuses_gpt2_conv1d_like_peft():
    model = _gpt2()
    with pytest.raises(dt.TargetError, match="Conv1D"):
        dt.attach(model, dt.SHiRA(r=1, targets=("c_attn",)))
    assert not any(isinstance(m, Host) for m in model.modules())


def test_sizes_are_checked_before_anything_is_built():
    layers = nn.Sequential(nn.Linear(4, 3), nn.Linear(6, 4))
    model = nn.Sequential(layers)
    with pytest.raises(dt.SpecError, match=r"SHiRA.r=2 gives '0.0' 14 .*use r <= 1"):
        dt.attach(model, dt.SHiRA(r=2, targets=("0.0", "0.1")))
    with pytest.raises(
        dt.SpecError, match=r"VBLoRA.vector_length=2 does not divide the 3x4 .*'0.0'"
    ):
        dt.attach(model, dt.VBLoRA(vector_length=2, targets=("0.0", "0.1")))
    assert all(type(m) is nn.Linear for m in layers) and model[0] is layers
    with pytest.raises(dt.SpecError, match=r"VBLoRA.topk=9 exceeds num_vectors=8"):
        dt.VBLoRA(num_vectors=8, topk=9)


def test_damaged_shira_positions_are_refused(tmp_path):
    pm = peft.get_peft_model(_bert(), peft.ShiraConfig(r=1, target_modules=["query"]))
    pm.base_model.model.encoder.layer[0].attention.self.query.shira_indices["default"][0, 0] = 99
    pm.save_pretrained(tmp_path / "p")
    model = _bert()
    with pytest.raises(dt.DeltaFileError, match="outside the 32x32 weight"):
        dt.load_adapter(model, tmp_path / "p")
    assert not any(isinstance(m, Host) for m in model.modules())


def test_peft_files_deltatune_cannot_express_are_refused(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_bert(), peft.VBLoRAConfig(
            r=1, num_vectors=4, vector_length=8, bias="all", target_modules=["query"]))
    pm.save_pretrained(tmp_path / "bias")
    with pytest.raises(dt.DeltaFileError, match="bias='all' is not supported"):
        dt.load_adapter(_bert(), tmp_path / "bias")


def test_module_docstrings_carry_the_paper():
    assert "arxiv.org/abs/2406.13175" in shira_mod.__doc__
    assert "arxiv.org/abs/2405.15179" in vblora_mod.__doc__
