"""Tiny transformers models built from configs (no download) and the shared pieces of the new
methods' peft-parity tests: token ids, a one-thread fixture, and the model output as one tensor."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: parity to 1e-5 must not depend on how the matmuls are split."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_bert(intermediate_size: int = 37):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=intermediate_size)
    return transformers.BertModel(cfg).eval()


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=40)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2Model(cfg).eval()


def output(model) -> torch.Tensor:
    """The first output of ``model(input_ids=IDS)``, without grad and warnings."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=IDS)[0]


# -- peft parity in both directions ---------------------------------------------------------------
def model_out(model, inputs: torch.Tensor) -> torch.Tensor:
    """The first output for token ids (``input_ids=``) or images (positional), without grad."""
    with torch.no_grad():
        out = model(input_ids=inputs) if inputs.dtype == torch.long else model(inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


def scramble(model, seed: int = 1, std: float = 1.0) -> None:
    """Give every trainable (adapter) parameter a random value, so the adapter moves the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def dt_to_peft(tmp_path, make, inputs, spec, std: float = 1.0) -> float:
    """Attach in deltatune, randomise, save in peft's layout, load with PeftModel.from_pretrained;
    the max |output difference|."""
    import copy

    import deltatune as dt

    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = make().eval()
    ours = copy.deepcopy(base)
    dt.attach(ours, spec)
    scramble(ours, std=std)
    y_ours = model_out(ours, inputs)
    assert (y_ours - model_out(base, inputs)).abs().max() > 1e-3
    dt.save_adapter(ours, tmp_path / "from_dt", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "from_dt").eval()
    return (model_out(back, inputs) - y_ours).abs().max().item()


def peft_to_dt(tmp_path, make, inputs, config, std: float = 1.0) -> float:
    """A peft model with randomised adapter weights, saved by peft, loaded by dt.load_adapter; the
    max |output difference|."""
    import copy

    import deltatune as dt

    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = make().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out / odd-r notices
        pm = peft.get_peft_model(copy.deepcopy(base), config).eval()
    scramble(pm, seed=2, std=std)
    y_peft = model_out(pm, inputs)
    assert (y_peft - model_out(base, inputs)).abs().max() > 1e-3
    pm.save_pretrained(tmp_path / "from_peft")
    ours = copy.deepcopy(base)
    dt.load_adapter(ours, tmp_path / "from_peft")
    return (model_out(ours, inputs) - y_peft).abs().max().item()
