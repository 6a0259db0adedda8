"""KV-cached generation (deltatune.lm.generate) on a tiny Llama with SmolLM2's real tokenizer:
token-exact against a cache-free greedy loop, stops at EOS, and many adapters in one batch give
each prompt exactly the tokens it gets alone with its adapter."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import smol_tokenizer, tiny_chat_llama

import deltatune as dt
from deltatune.lm.generate import (
    Generation,
    causal_lm,
    encode,
    generate,
    prompt_text,
    stop_ids,
)

PROMPTS = [
    "hi",
    "What is the capital of France? Answer in one word, please.",
    [{"role": "system", "content": "Be short."}, {"role": "user", "content": "2+2?"}],
    "Name three primary colours and say which one you like best.",
    "ok",
    "Tell me a story.",
]


@pytest.fixture(scope="module")
def tok():
    return smol_tokenizer()


def chat_llama(seed=0, std=0.3):
    """The tiny Llama with weights drawn wider than its init (std 0.02 makes it repeat one token):
    varied answers, so token equality says something."""
    lm = tiny_chat_llama(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return lm


def lora_model(names=("a", "b", "c"), seed=0):
    """The tiny Llama with LoRA adapters ``names`` of different ranks and random non-zero B."""
    lm = chat_llama(seed)
    for i, n in enumerate(names):
        targets = ["q_proj", "v_proj", "o_proj", "up_proj"]
        dt.attach(lm, dt.LoRA(r=2 + 2 * i, alpha=4, targets=targets), name=n)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in lm.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    dt.set_active(lm, [])
    return lm


def reference_greedy(lm, tok, prompt, n):
    """Greedy decoding without a cache: the whole sequence runs through the model at every step."""
    ids = encode(tok, prompt_text(tok, prompt))
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = lm(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


def test_greedy_equals_cache_free_loop(tok):
    lm = chat_llama()
    got = generate(lm, tok, PROMPTS, max_new_tokens=12, ignore_eos=True, batch_size=4)
    assert [len(g.tokens) for g in got] == [12] * len(PROMPTS)
    for p, g in zip(PROMPTS, got):
        assert g.tokens == reference_greedy(lm, tok, p, 12)
        assert g.finish == "length"
        assert g.prompt_tokens == len(encode(tok, prompt_text(tok, p)))
        assert g.text == tok.decode(g.tokens, skip_special_tokens=True)


def test_active_delta_applies_and_wrapper_is_unwrapped(tok):
    lm = lora_model()
    dt.set_active(lm, "b")
    wrapper = torch.nn.Module()
    wrapper.lm = lm  # a deltatune model entry's model: the causal LM as .lm
    assert causal_lm(wrapper) is lm
    got = generate(wrapper, tok, PROMPTS[:2], max_new_tokens=8, ignore_eos=True)
    assert [g.tokens for g in got] == [reference_greedy(lm, tok, p, 8) for p in PROMPTS[:2]]
    with pytest.raises(TypeError, match="causal LM"):
        generate(torch.nn.Linear(2, 2), tok, ["hi"])


def test_stop_ids_hold_eos_and_end_of_turn(tok):
    lm = chat_llama()
    ids = stop_ids(tok, lm)
    assert tok.eos_token_id in ids and tok.convert_tokens_to_ids("<|im_end|>") in ids


def test_stops_at_eos_and_rows_leave_the_batch(tok):
    lm = chat_llama()
    free = generate(lm, tok, PROMPTS, max_new_tokens=16, ignore_eos=True)
    # a token that the first prompt writes at step k (and not before) becomes an EOS of the model
    first = free[0].tokens
    k = next(i for i in range(3, 16) if first[i] not in first[:i])
    lm.generation_config.eos_token_id = [tok.eos_token_id, first[k]]
    got = generate(lm, tok, PROMPTS, max_new_tokens=16, batch_size=len(PROMPTS))
    assert got[0].finish == "eos" and got[0].tokens == first[: k + 1]
    assert got[0].text == tok.decode(first[:k], skip_special_tokens=True)
    for g, f in zip(got, free):  # every row: its free-running tokens up to its first stop
        cut = next((i + 1 for i, t in enumerate(f.tokens) if t == first[k]), len(f.tokens))
        assert g.tokens == f.tokens[:cut]
        assert g.finish == ("eos" if cut < 16 or f.tokens[-1] == first[k] else "length")


def test_stop_strings_cut_the_text(tok):
    lm = chat_llama()
    g = generate(lm, tok, ["hi"], max_new_tokens=8, ignore_eos=True)[0]
    word = g.text[len(g.text) // 2:][:3]
    cut = generate(lm, tok, ["hi"], max_new_tokens=8, ignore_eos=True, stop=[word])[0]
    assert cut.finish == "stop" and cut.text == g.text[: g.text.find(word)]


def test_routed_batch_equals_each_prompt_alone(tok):
    lm = lora_model()
    routes = ["a", "b", None, "c", "a", "c"]
    together = generate(lm, tok, PROMPTS, adapters=routes, max_new_tokens=10, ignore_eos=True)
    outputs = set()
    for p, r, g in zip(PROMPTS, routes, together):
        alone = generate(lm, tok, [p], adapters=[r], max_new_tokens=10, ignore_eos=True)[0]
        assert g.tokens == alone.tokens and g.adapter == r
        dt.set_active(lm, [] if r is None else [r])  # the same adapter, active instead of routed
        assert g.tokens == reference_greedy(lm, tok, p, 10)
        dt.set_active(lm, [])
        outputs.add(tuple(g.tokens))
    # the adapters really differ: the same prompt gets other tokens from each of them
    per_adapter = generate(lm, tok, [PROMPTS[1]] * 4, adapters=["a", "b", "c", None],
                           max_new_tokens=10, ignore_eos=True)
    assert len({tuple(g.tokens) for g in per_adapter}) == 4


def test_routed_batch_with_eos_equals_alone(tok):
    lm = lora_model()
    routes = ["c", None, "a", "b", "b", "a"]
    free = generate(lm, tok, PROMPTS, adapters=routes, max_new_tokens=14, ignore_eos=True)
    # stop on tokens written mid-way by two rows: rows end at different steps
    lm.generation_config.eos_token_id = [free[0].tokens[3], free[3].tokens[6]]
    together = generate(lm, tok, PROMPTS, adapters=routes, max_new_tokens=14, batch_size=8)
    assert {g.finish for g in together} >= {"eos"}
    for p, r, g in zip(PROMPTS, routes, together):
        alone = generate(lm, tok, [p], adapters=r, max_new_tokens=14)[0]
        assert g.tokens == alone.tokens and g.finish == alone.finish


def test_sampling_is_seeded(tok):
    lm = chat_llama()
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, ignore_eos=True)
    a = generate(lm, tok, PROMPTS[:3], seed=3, **kw)
    b = generate(lm, tok, PROMPTS[:3], seed=3, **kw)
    c = generate(lm, tok, PROMPTS[:3], seed=4, **kw)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]
    # top_p tiny: only the most likely token survives, which is greedy
    greedy = generate(lm, tok, PROMPTS[:3], max_new_tokens=8, ignore_eos=True)
    nucleus = generate(lm, tok, PROMPTS[:3], **{**kw, "top_p": 1e-6})
    assert [g.tokens for g in nucleus] == [g.tokens for g in greedy]


def test_raw_prompts_and_bad_calls(tok):
    lm = chat_llama()
    g = generate(lm, tok, ["Once upon a time"], raw=True, max_new_tokens=4, ignore_eos=True)[0]
    assert isinstance(g, Generation)
    assert g.prompt_tokens == len(tok("Once upon a time")["input_ids"])
    lora = lora_model()
    with pytest.raises(ValueError, match="no delta named 'zz'"):
        generate(lora, tok, ["hi"], adapters=["zz"])
    with pytest.raises(ValueError, match="one per prompt"):
        generate(lora, tok, ["hi", "ho"], adapters=["a"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(lm, tok, ["hi"], max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt is a string"):
        generate(lm, tok, [42])
