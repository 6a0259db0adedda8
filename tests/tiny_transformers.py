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
