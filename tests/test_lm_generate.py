"""KV-cached generation (deltatune.lm.generate) on a tiny Llama with SmolLM2's real tokenizer:
token-exact against a cache-free greedy loop, stops at EOS, and many adapters in one batch give
each prompt exactly the tokens it gets alone with its adapter."""

from __future__ import annotations

import json

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


def test_matches_transformers_generate(tok):
    """Greedy answers equal transformers' own generate (left-padded batch, stop at an EOS)."""
    from deltatune.lm.generate import left_pad

    lm = chat_llama()
    free = generate(lm, tok, PROMPTS, max_new_tokens=10, ignore_eos=True)
    eos = free[1].tokens[4]  # written mid-answer by one prompt: its row stops there
    lm.generation_config.eos_token_id = eos
    ours = generate(lm, tok, PROMPTS, max_new_tokens=10)
    rows = [encode(tok, prompt_text(tok, p)) for p in PROMPTS]
    ids, mask = left_pad(rows, tok.pad_token_id)
    with torch.no_grad():
        out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10,
                          do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    for g, row in zip(ours, out[:, ids.shape[1]:].tolist()):
        assert g.tokens == (row[: row.index(eos) + 1] if eos in row else row)
    assert ours[1].finish == "eos"


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
    cut = generate(lm, tok, ["hi"], max_new_tokens=8, ignore_eos=True, stop=["zzz", word])[0]
    assert cut.finish == "stop" and cut.text == g.text[: g.text.find(word)]
    # decoding ended at the token that completed the stop string
    assert cut.tokens == g.tokens[: len(cut.tokens)] and len(cut.tokens) < len(g.tokens)
    assert word in tok.decode(cut.tokens) and word not in tok.decode(cut.tokens[:-1])


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


# -- deltatune generate ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    return build_tiny_dir(tmp_path_factory.mktemp("lm"), tok)


def build_tiny_dir(root, tok):
    """A transformers directory of the tiny chat Llama, and LoRA adapters saved for it (a, b, c;
    and `wide`, for a wider model)."""
    from deltatune.models import load_model

    chat_llama().save_pretrained(root / "tiny-chat")
    tok.save_pretrained(root / "tiny-chat")
    entry = load_model(str(root / "tiny-chat"))
    gen = torch.Generator().manual_seed(5)
    for n in ("a", "b", "c"):
        dt.attach(entry.model, dt.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]), name=n)
        with torch.no_grad():
            for pname, p in entry.model.named_parameters():
                if f"deltas.{n}.lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        dt.save_adapter(entry.model, root / f"adapter-{n}", name=n)
    # an adapter of another base: a wider model, held as .lm as the model entry holds its LM
    wide = torch.nn.Module()
    wide.lm = tiny_chat_llama(hidden=48)
    dt.attach(wide, dt.LoRA(r=2, targets=["q_proj", "v_proj"]), name="w")
    dt.save_adapter(wide, root / "adapter-wide", name="w")
    return root


def _cli(args, capsys):
    from deltatune.cli.app import main

    rc = main([str(a) for a in args])
    return rc, capsys.readouterr()


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_generate_routes_rows_to_their_adapters(tiny_dir, tmp_path, capsys, tok):
    data = tmp_path / "prompts.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}], "adapter": "a"},
            {"prompt": "What is the capital of France?", "adapter": "b"},
            {"prompt": "ok"},  # no adapter: the base model
            {"messages": [{"role": "user", "content": "Tell me a story."},
                          {"role": "assistant", "content": "dropped"}], "adapter": "c"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["generate", "--model", tiny_dir / "tiny-chat", "--data", data,
            "--max-new-tokens", 6, "--out", tmp_path / "out"]
    for n in "abc":
        args += ["--adapter", f"{n}={tiny_dir / f'adapter-{n}'}"]
    rc, cap = _cli(args, capsys)
    assert rc == 0, cap.err
    got = _lines(tmp_path / "out" / "generations.jsonl")
    assert [g["adapter"] for g in got] == ["a", "b", None, "c"]
    assert got[3]["prompt"] == [{"role": "user", "content": "Tell me a story."}]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["prompts"] == 4 and results["new_tokens"] == sum(g["new_tokens"] for g in got)
    # each row alone with its adapter, through --prompt and --route
    for row, g in zip(rows, got):
        text = row["messages"][0]["content"] if "messages" in row else row["prompt"]
        one = tmp_path / f"one-{g['adapter']}"
        args = ["generate", "--model", tiny_dir / "tiny-chat", "--prompt", text,
                "--max-new-tokens", 6, "--out", one]
        if g["adapter"]:
            args += ["--adapter", tiny_dir / f"adapter-{g['adapter']}"]
        assert _cli(args, capsys)[0] == 0
        assert _lines(one / "generations.jsonl")[0]["text"] == g["text"]


def test_cli_generate_bad_inputs(tiny_dir, tmp_path, capsys):
    model = ["--model", tiny_dir / "tiny-chat"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's own file")
    a, b = f"a={tiny_dir / 'adapter-a'}", f"b={tiny_dir / 'adapter-b'}"
    cases = [
        (["--out", tmp_path / "x"], "no prompts"),
        (["--prompt", "hi", "--adapter", tmp_path / "missing", "--out", tmp_path / "x"],
         "no such directory"),
        (["--prompt", "hi", "--adapter", tiny_dir, "--out", tmp_path / "x"], "delta"),
        (["--prompt", "hi", "--adapter", tiny_dir / "adapter-wide", "--out", tmp_path / "x"],
         "another base model"),
        (["--prompt", "hi", "--adapter", a, "--adapter", b, "--route", "zz", "--out",
          tmp_path / "x"], "route 'zz' names no loaded adapter"),
        (["--prompt", "hi", "--adapter", a, "--adapter", b, "--out", tmp_path / "x"],
         "--route"),
        (["--prompt", "hi", "--prompt", "ho", "--prompt", "x", "--route", "base", "--route",
          "base", "--out", tmp_path / "x"], "once per prompt"),
        (["--prompt", "hi", "--out", tmp_path / "mine"], "not empty"),
        (["--prompt", "hi", "--out", tmp_path / "mine", "--overwrite"], "did not write"),
        (["--data", tmp_path / "none.jsonl", "--out", tmp_path / "x"], "no such file"),
    ]
    for extra, message in cases:
        rc, cap = _cli(["generate", *model, *extra], capsys)
        err = cap.err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error:"), (extra, cap.err)
        assert message in err[0], (message, err[0])
        assert not (tmp_path / "x").exists()  # a failed job leaves no output behind
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's own file"
    rc, cap = _cli(["generate", "--model", "minilm", "--prompt", "hi", "--out", tmp_path / "x"],
                   capsys)
    assert rc == 2 and "causal language model" in cap.err


def test_cli_generate_help_has_examples(capsys):
    rc, cap = _cli(["generate", "--help"], capsys)
    assert rc == 0 and "--adapter" in cap.out and "deltatune generate --model smollm2" in cap.out
