"""Shared fixtures for the language-model tests: SmolLM2's real tokenizer (with its chat template)
and a tiny Llama over its vocabulary, so chat formatting, masking and generation run on the real
tokens in seconds."""

from __future__ import annotations

import functools

import torch
import transformers


@functools.lru_cache(maxsize=1)
def smol_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (cached folder, or read from the bundled GGUF)."""
    from deltatune.models.gguf import smollm2_tokenizer

    return smollm2_tokenizer()


def tiny_chat_llama(seed: int = 0, hidden: int = 32, layers: int = 2):
    """A 2-layer Llama with SmolLM2's vocabulary (random weights, eval mode, float32)."""
    tok = smol_tokenizer()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return transformers.LlamaForCausalLM(cfg).eval()
