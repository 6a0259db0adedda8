"""Quantized frozen bases (issue 21): formats, training on top, LoftQ, merging, peft, bad input."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.quantized import QuantizedBase
from deltatune.quant import QuantizeError, drop_float_references, quantize_base
from deltatune.quant.formats import (
    dequantize_gguf,
    dequantize_int4,
    dequantize_nf4,
    quantize_gguf,
    quantize_int4,
    quantize_nf4,
)

gguf = pytest.importorskip("gguf")


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# -- formats --------------------------------------------------------------------------------------
def test_int4_and_nf4_round_trip_within_their_step():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    parts = quantize_int4(w, 32)
    assert parts["packed"].dtype == torch.uint8 and parts["packed"].shape == (8, 64)
    back = dequantize_int4(parts, 32, torch.float32)
    step = parts["scale"].float().repeat_interleave(32, dim=1)  # (8, 128): each value's step
    assert ((back - w).abs() <= step / 2 + 1e-3).all()
    nf = dequantize_nf4(quantize_nf4(w, 32), 32, torch.float32)
    assert 0.02 < _rel(nf, w) < 0.15  # 4 bits: a real but bounded error
    exact = (torch.arange(32.0) % 16)[None] * 0.5 - 2  # on the int4 grid: back exactly
    assert torch.equal(dequantize_int4(quantize_int4(exact, 32), 32, torch.float32), exact)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_dequantize_as_the_gguf_package(qtype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    torch.manual_seed(1)
    w = torch.randn(6, 96)
    blocks = quantize_gguf(w, qtype)
    ref = dequantize(blocks.numpy(), GGMLQuantizationType[qtype])
    ours = dequantize_gguf(blocks, qtype, torch.float32)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-6)
    assert _rel(ours, w) < (0.01 if qtype == "Q8_0" else 0.15)


# -- quantized hosts ------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4", "q4_0", "q4_1", "q8_0"])
def test_quantize_base_keeps_blocks_and_the_output_close(scheme):
    model = _mlp()
    x = torch.randn(4, 64)
    ref = model(x)
    report = quantize_base(model, scheme, group_size=32 if scheme in ("int4", "nf4") else None)
    assert report.layers == 2 and report.ratio < (0.3 if scheme in ("int8", "q8_0") else 0.2)
    assert all(isinstance(model[i], QuantizedBase) for i in (0, 2))
    assert not any(p.dim() == 2 for p in model.parameters())  # no float weight matrix left
    assert _rel(model(x), ref) < (0.02 if scheme in ("int8", "q8_0") else 0.2)


def _linear_methods() -> list[str]:
    """Every registered method whose contract example puts it on the Linear layers of the tiny
    MLP (the registry's own examples, so a new Linear method is tested here too)."""
    from deltatune.core.spec import registered_methods

    return sorted(n for n, cls in registered_methods().items()
                  if cls.example.model == "mlp" and "targets" in cls.example.options
                  and "linear" in cls.host_kinds)


@pytest.mark.parametrize("method", ["dora", *_linear_methods()])
def test_linear_methods_train_on_a_quantized_base(method):
    from deltatune.core.spec import registered_methods

    model = nn.Sequential(OrderedDict(fc1=nn.Linear(64, 96), act=nn.ReLU(),
                                      fc2=nn.Linear(96, 32))).eval()
    quantize_base(model, "int4", group_size=32)
    layers = [model.fc1, model.fc2]
    blocks = [[b.clone() for b in m.buffers()] for m in layers]
    if method == "dora":
        spec = dt.LoRA(r=4, targets=("fc1", "fc2"), dora=True)
    elif method == "qalora":  # its group follows the base's (32 here), not the float example's 4
        spec = dt.QALoRA(r=2, targets=("fc1", "fc2"))
    else:
        cls = registered_methods()[method]
        spec = cls(**cls.example.options)
    x = torch.randn(4, 64, requires_grad=True)
    with torch.no_grad():
        before = model(x)
    dt.attach(model, spec)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained and all(".deltas." in n for n in trained)
    assert x.grad is not None and x.grad.abs().sum() > 0  # activations get gradients
    for layer, before_blocks in zip(layers, blocks):  # the blocks never change
        assert all(torch.equal(a, b) for a, b in zip(layer.buffers(), before_blocks))
    moved = [n for n, p in model.named_parameters() if n in start and not torch.equal(p, start[n])]
    assert moved  # the delta did train (SVD-form deltas start at E = 0 and move little in 2 steps)
    with torch.no_grad():
        assert (model(x) - before).abs().max() > 0


def test_backward_keeps_no_float_copy_of_a_quantized_weight():
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    quantize_base(model, "int4")
    dt.attach(model, dt.LoRA(r=2, targets=["0", "1"]))
    saved: list[torch.Size] = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(torch.randn(3, 256)).sum()
    loss.backward()
    assert torch.Size([256, 256]) not in saved, saved


# -- LoftQ ----------------------------------------------------------------------------------------
def _smollm2_layers(names=("blk.0.attn_q.weight", "blk.3.ffn_up.weight")):
    """Two of SmolLM2's real weights (read from the bundled GGUF, dequantized) as Linears."""
    from deltatune.models.gguf import smollm2_gguf
    from deltatune.models.gguf_blocks import _float, _Reader

    reader = _Reader(smollm2_gguf())
    tensors = {t.name: t for t in reader.tensors}
    layers = []
    for name in names:
        w = _float(tensors[name])
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
        layer.weight = nn.Parameter(w)
        layers.append(layer)
    return nn.Sequential(*layers)


def test_loftq_lowers_the_error_to_the_float_layers_of_smollm2():
    model = _smollm2_layers()
    floats = [m.weight.detach().clone() for m in model]
    quantize_base(model, "nf4", keep_float=True)
    alone = [_rel(m.dequantize(), w) for m, w in zip(model, floats)]
    dt.attach(model, dt.LoRA(r=16, alpha=16, init="loftq", targets=["0", "1"]))
    for host, w, err in zip(model, floats, alone):
        eff = host.base.dequantize() + host.deltas["default"].product()
        assert _rel(eff, w) < 0.98 * err, (_rel(eff, w), err)  # measured: 0.093 -> 0.088
        assert host.base.float_reference is None  # used, then dropped
    # detach puts the original quantized layers back (not the LoftQ-adjusted ones)
    originals = [h.deltas["default"]._original_base[0] for h in model]
    dt.detach(model)
    assert all(model[i] is originals[i] for i in range(2))


def test_loftq_needs_a_quantized_base_with_its_float_weights():
    model = _mlp()
    with pytest.raises(dt.TargetError, match="needs a quantized base"):
        dt.attach(model, dt.LoRA(r=2, init="loftq", targets=["0"]))
    quantize_base(model, "int4", group_size=32)
    with pytest.raises(dt.TargetError, match="keep_float=True"):
        dt.attach(model, dt.LoRA(r=2, init="loftq", targets=["0"]))
    assert isinstance(model[0], QuantizedBase)  # nothing was left behind
    with pytest.raises(dt.SpecError, match="loftq_iters"):
        dt.LoRA(init="loftq", loftq_iters=0)
    with pytest.raises(dt.TargetError, match="quantized"):
        dt.attach(model, dt.LoRA(r=2, init="pissa", targets=["0"]))


# -- merging --------------------------------------------------------------------------------------
def _trained_lora(scheme="int4"):
    model = _mlp()
    quantize_base(model, scheme, group_size=32 if scheme == "int4" else None)
    dt.attach(model, dt.LoRA(r=4, alpha=8, targets=["0", "2"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def test_merge_into_a_quantized_base_must_say_how():
    model = _trained_lora()
    base = model[0].base
    with pytest.raises(dt.StateError, match=r"dtype='float32'.*requantize=True"):
        dt.merge(model)
    with pytest.raises(dt.StateError, match="not both"):
        dt.merge(model, requantize=True, dtype="float32")
    assert model[0].base is base and not model[0].merged  # nothing changed


def test_merge_requantizes_reports_the_error_and_refuses_an_inexact_unmerge():
    model = _trained_lora()
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = model(x)
    with pytest.warns(UserWarning, match="4-bit layer"):  # measured to lose a trained task
        dt.merge(model, requantize=True)
    errors = dt.requantization_errors(model)
    assert set(errors) == {"0", "2"} and all(0 < e < 0.2 for e in errors.values())
    assert isinstance(model[0].base, QuantizedBase)
    with torch.no_grad():
        assert _rel(model(x), y) < 0.2
    with pytest.raises(dt.StateError, match="keep_blocks=True"):
        dt.unmerge(model)


def test_requantizing_an_eight_bit_merge_does_not_warn():
    import warnings

    model = _trained_lora("q8_0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dt.merge(model, requantize=True)
    assert all(e < 0.05 for e in dt.requantization_errors(model).values())


def test_merge_keep_blocks_unmerges_exactly_and_float_merge_upcasts():
    model = _trained_lora()
    x = torch.randn(5, 64)
    originals = [model[i].base for i in (0, 2)]
    with torch.no_grad():
        y = model(x)
    dt.merge(model, requantize=True, keep_blocks=True)
    dt.unmerge(model)
    assert [model[i].base for i in (0, 2)] == originals
    with torch.no_grad():
        assert torch.equal(model(x), y)
    dt.merge(model, dtype="float32")
    assert type(model[0].base) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
    dt.unmerge(model)  # the quantized blocks come back
    assert model[0].base is originals[0]
    dt.merge(model, dtype="float32", unload=True)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear


# -- peft interop ---------------------------------------------------------------------------------
def test_adapter_trained_on_a_quantized_base_loads_in_peft_on_the_float_base(tmp_path):
    peft = pytest.importorskip("peft")
    from tiny_lm import tiny_chat_llama

    float_lm = tiny_chat_llama(hidden=64)
    lm = copy.deepcopy(float_lm)
    quantize_base(lm, "int4", group_size=16)
    dt.attach(lm, dt.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    ids = torch.tensor([[1, 5, 9, 200, 17, 3]])
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        lm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    dt.save_adapter(lm, tmp_path / "peft", format="peft")
    ours = copy.deepcopy(float_lm)
    dt.load_adapter(ours, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(float_lm), tmp_path / "peft").eval()
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        base = float_lm(input_ids=ids).logits
    assert (a - base).abs().max() > 1e-4  # the adapter changes the output
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# -- bad input ------------------------------------------------------------------------------------
def test_bad_quantization_requests_are_one_line_errors_that_change_nothing():
    model = _mlp()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(QuantizeError, match="unknown quantization 'int3'") as err:
        quantize_base(model, "int3")
    assert "\n" not in str(err.value)
    with pytest.raises(QuantizeError, match=r"group size 48 does not divide the 64 inputs of '0'"):
        quantize_base(model, "int4", group_size=48)
    with pytest.raises(QuantizeError, match="q4_0 blocks hold 32 values"):
        quantize_base(model, "q4_0", group_size=64)
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(QuantizeError, match="no Linear layer"):
        quantize_base(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "int8")
    dt.attach(model, dt.LoRA(r=2, targets=["0"]))
    with pytest.raises(QuantizeError, match="quantize the base first"):
        quantize_base(model, "int4", group_size=32)


def test_drop_float_references_frees_them_and_the_summary_counts_quantized_weights():
    model = _mlp()
    n = sum(p.numel() for p in model.parameters())
    quantize_base(model, "int4", group_size=32, keep_float=True)
    assert dt.trainable_summary(model).total == n  # blocks count as the values they hold
    assert drop_float_references(model) == 2 and drop_float_references(model) == 0


def _gguf_file(path, arch: str, q_type=None):
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    if q_type is not None:  # raw bytes of one row of blocks of that type
        from gguf import GGML_QUANT_SIZES

        block, nbytes = GGML_QUANT_SIZES[q_type]
        raw = np.zeros((32, 256 // block * nbytes), np.uint8)
        writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=q_type)
    else:
        writer.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGMLQuantizationType


def test_gguf_blocks_refuse_other_architectures_and_quant_types(tmp_path):
    from gguf import GGMLQuantizationType

    from deltatune.models import ModelError
    from deltatune.models.gguf_blocks import check_gguf_blocks

    _gguf_file(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(ModelError, match="architecture 'gpt2' cannot be kept in blocks"):
        check_gguf_blocks(tmp_path / "gpt2.gguf")
    _gguf_file(tmp_path / "k.gguf", "llama", GGMLQuantizationType.Q4_K)
    with pytest.raises(ModelError, match=r"attn_q.weight is Q4_K.*\(Q4_0, Q4_1, Q8_0\)"):
        check_gguf_blocks(tmp_path / "k.gguf")


def test_load_model_refuses_gguf_blocks_for_a_model_not_from_gguf():
    from deltatune.models import load_model

    with pytest.raises(QuantizeError, match="minilm is not loaded from GGUF"):
        load_model("minilm", num_labels=2, quantize="gguf")
    with pytest.raises(QuantizeError, match="unknown quantization 'fp3'"):
        load_model("minilm", num_labels=2, quantize="fp3")


# -- the real GGUF, kept in blocks ----------------------------------------------------------------
def test_smollm2_loads_in_its_own_blocks_with_the_float_models_weights():
    """Every decoder Linear of SmolLM2 holds the file's Q4_1 blocks; a q_proj (whose rows
    llama.cpp permutes) dequantizes to exactly what transformers' GGUF loader makes of it."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from deltatune.models import load_model
    from deltatune.models.gguf import smollm2_gguf
    from deltatune.models.gguf_blocks import _Reader
    from deltatune.quant.layers import GGUFLinear

    entry = load_model("smollm2", quantize="gguf")
    lm = entry.model.lm
    linears = [m for n, m in lm.named_modules() if n.startswith("model.layers.")
               and isinstance(m, (nn.Linear, GGUFLinear))]
    assert len(linears) == 30 * 7 and all(isinstance(m, GGUFLinear) for m in linears)
    assert all(m.qtype == "Q4_1" for m in linears)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # tied, as in the file
    tensor = next(t for t in _Reader(smollm2_gguf()).tensors if t.name == "blk.2.attn_k.weight")
    ref = dequantize(np.array(tensor.data), GGMLQuantizationType.Q4_1)
    ref = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3}
                               ).process(ref, "blk.2.attn_k.weight").weights
    got = lm.model.layers[2].self_attn.k_proj.dequantize()
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6, rtol=0)
    dt.attach(entry.model, dt.LoRA(r=2, targets=["q_proj", "v_proj"]))
    ids = torch.tensor([[1, 504, 3458, 314]])
    out = entry.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    out[0, -1].logsumexp(-1).backward()
    assert lm.model.layers[0].self_attn.q_proj.deltas["default"].lora_B.grad is not None


def test_smollm2_int4_is_re_quantized_from_its_blocks_like_the_float_path():
    """load_model("smollm2", quantize="int4") converts the file's blocks layer by layer (no float
    model in between) and holds the same int4 codes as quantizing the float model."""
    from deltatune.models import load_model
    from deltatune.quant.layers import GroupQuantLinear

    direct = load_model("smollm2", quantize="int4")
    assert "re-quantized to int4" in direct.source
    layers = dict(direct.model.named_modules())
    name = "lm.model.layers.3.mlp.down_proj"
    assert isinstance(layers[name], GroupQuantLinear)
    assert not any(type(m) is nn.Linear for n, m in layers.items() if ".layers." in n)
    via_float = load_model("smollm2")
    quantize_base(via_float.model, "int4", exclude=via_float.head)
    ref = via_float.model.get_submodule(name)
    assert torch.equal(layers[name].packed, ref.packed)
    assert torch.equal(layers[name].minimum, ref.minimum)


# -- the CLI ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model, quantize, message", [
    ("small-cnn", "int3", "unknown quantization 'int3'"),
    ("small-cnn", "gguf", "small-cnn is not loaded from GGUF"),
    ("small-cnn", "int8", "no Linear layer to quantize"),  # its one Linear is the new head
])
def test_train_quantize_refusals_are_one_line_and_write_nothing(model, quantize, message,
                                                                capsys, tmp_path):
    pytest.importorskip("mnist")
    from deltatune.cli.app import main

    out = tmp_path / "run"
    rc = main(["train", "--model", model, "--data", "mnist", "--limit", "32", "--max-steps", "1",
               "--quantize", quantize, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and err[-1].startswith("error:") and message in err[-1], err
    assert not out.exists()


def _quantized_mlp(fmt: str) -> nn.Module:
    from deltatune.quant.layers import GGUFLinear

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(128, 96), act=nn.ReLU(),
                                      fc2=nn.Linear(96, 32))).eval()
    if fmt == "int4":
        quantize_base(model, "int4", group_size=32)
    else:  # GGUF Q4_1 blocks of 32
        for name in ("fc1", "fc2"):
            layer = getattr(model, name)
            setattr(model, name, GGUFLinear.from_weight(layer.weight.detach(), layer.bias, "Q4_1"))
    return model


def _trained(model: nn.Module, spec) -> nn.Module:
    dt.attach(model, spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # a delta the size of a trained one, not zero
    return model


@pytest.mark.parametrize("fmt", ["int4", "Q4_1"])
def test_qalora_merges_into_a_four_bit_base_without_re_rounding(fmt):
    """QA-LoRA's change is constant over each quantization group, so a re-quantizing merge moves
    only the groups' offsets: no code changes, outputs equal to float16 rounding of the offsets,
    no warning; a plain LoRA of the same size on the same base is re-rounded (and warned about)."""
    x = torch.randn(8, 128)
    model = _trained(_quantized_mlp(fmt), dt.QALoRA(r=2, targets=("fc1", "fc2")))
    codes = {n: (m.base.packed if fmt == "int4" else m.base.blocks).clone()
             for n, m in [("fc1", model.fc1), ("fc2", model.fc2)]}
    with torch.no_grad():
        before = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no re-rounding warning
        dt.merge(model, requantize=True, keep_blocks=True)
    with torch.no_grad():
        after = model(x)
    qa_gap = float((after - before).abs().max())
    assert qa_gap < 2e-3 * float(before.abs().max()), qa_gap
    for name in ("fc1", "fc2"):
        base = getattr(model, name).base
        assert base.merge_kind == "offset"
        if fmt == "int4":  # the same codes and scales, new minima
            assert torch.equal(base.packed, codes[name])
        else:  # Q4_1 rows: per 20-byte block, d (2 bytes) and the codes (16) are unchanged
            old, new = codes[name].view(-1, 20), base.blocks.view(-1, 20)
            assert torch.equal(old[:, :2], new[:, :2]) and torch.equal(old[:, 4:], new[:, 4:])
            assert not torch.equal(old[:, 2:4], new[:, 2:4])
    dt.unmerge(model)  # keep_blocks: the original blocks come back exactly
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)

    lora = _trained(_quantized_mlp(fmt), dt.LoRA(r=2, targets=("fc1", "fc2")))
    with torch.no_grad():
        lora_before = lora(x)
    with pytest.warns(UserWarning, match="re-rounded .*dt.QALoRA"):
        dt.merge(lora, requantize=True)
    with torch.no_grad():
        lora_gap = float((lora(x) - lora_before).abs().max())
    assert lora.fc1.base.merge_kind == "requantized"
    assert lora_gap > 10 * qa_gap, (lora_gap, qa_gap)


def test_qalora_equals_its_weight_change_and_pools_like_peft():
    """The forward is ``h + s·B·A·pool(x)`` with peft's pooling (group mean × groups), and equals
    the base plus its dense ``delta_weight`` (what merges and task vectors use)."""
    torch.manual_seed(1)
    model = _trained(nn.Sequential(OrderedDict(fc=nn.Linear(64, 8))),
                     dt.QALoRA(r=2, alpha=4, group_size=16, targets=("fc",)))
    delta = model.fc.part("default")
    x = torch.randn(3, 64)
    pooled = x.view(3, 4, 16).mean(-1) * 4
    expected = model.fc.base(x) + (pooled @ delta.lora_A.T @ delta.lora_B.T) * 2.0
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6)
        change = delta.delta_weight(model.fc)["weight"]
        assert torch.allclose(model(x), model.fc.base(x) + x @ change.T, atol=1e-5)
        assert torch.equal(change[:, :16], change[:, :1].expand(-1, 16))  # constant per group


@pytest.mark.parametrize("options, match", [
    (dict(group_size=24), "does not divide"),
    (dict(group_size=16), "not a multiple of .*quantization group 32"),
    (dict(r=5, group_size=32), "r=5 exceeds"),
    (dict(group_size=0), "group_size=0 must be a positive integer"),
])
def test_qalora_bad_groups_are_one_line_errors(options, match):
    model = _quantized_mlp("int4")
    with pytest.raises(dt.SpecError, match=match):
        dt.attach(model, dt.QALoRA(**{"r": 2, "targets": ("fc1", "fc2"), **options}))
    assert not dt.delta_names(model)  # attach rolled back
