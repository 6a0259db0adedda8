"""Evaluation by what the model says (deltatune.lm.evaluate) on a tiny Llama with SmolLM2's real
tokenizer: exact match after normalisation, the completion loss against a full-logits
computation (and only the answer positions' logits computed), reward accuracy by hand; and
`deltatune eval` on chat and preference files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_lm_generate import build_tiny_dir, chat_llama, lora_model
from tiny_lm import smol_tokenizer

import deltatune as dt
from deltatune.lm.evaluate import (
    chat_reference,
    completion_ids,
    completion_logprobs,
    evaluate_generation,
    normalize,
    reward_accuracy,
)
from deltatune.lm.generate import generate
from deltatune.lm.template import ChatError

SYSTEM = {"role": "system", "content": "Answer in one word."}


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tok():
    return smol_tokenizer()


def test_normalize_strips_and_casefolds():
    assert normalize("  Paris \n") == normalize("PARIS") == "paris"
    assert normalize("Straße") == normalize("STRASSE")
    assert normalize("Paris.") != normalize("Paris")  # only whitespace and case are forgiven


def test_chat_reference_picks_the_prompt_and_answer():
    ex = {"messages": [SYSTEM, user("Capital of France?"), bot("Paris"), user("And Spain?"),
                       bot("The capital is Madrid.")], "answer": "Madrid"}
    prompt, ref = chat_reference(ex)
    assert prompt == ex["messages"][:4] and ref == "Madrid"
    assert chat_reference({"messages": ex["messages"][:3]}) == (ex["messages"][:2], "Paris")
    assert chat_reference({"messages": [user("hi")], "answer": "hello"}) == ([user("hi")], "hello")
    with pytest.raises(ChatError, match="reference"):
        chat_reference({"messages": [user("hi")]})
    with pytest.raises(ChatError, match="prompt is empty"):
        chat_reference({"messages": [bot("hi")]})


def test_completion_ids_follow_the_template(tok):
    prompt, done = completion_ids(tok, [user("hi")], [bot("Hello there")])
    text = tok.decode(prompt + done)
    whole = tok.apply_chat_template([user("hi"), bot("Hello there")], tokenize=False)
    assert text == whole.rstrip()
    assert done[-1] == tok.convert_tokens_to_ids("<|im_end|>")  # learned to stop; no newline


def _full_logits_loss(lm, tok, pairs):
    """Token-mean cross-entropy of every completion from one unpadded full forward per example."""
    total, count, per = 0.0, 0, []
    with torch.no_grad():
        for p, c in pairs:
            ids = torch.tensor([p + c])
            logits = lm(input_ids=ids).logits[0]  # (T, V): every position
            ce = F.cross_entropy(logits[len(p) - 1:-1], ids[0, len(p):], reduction="sum")
            total, count = total + float(ce), count + len(c)
            per.append(float(ce) / len(c))
    return total / count, per


def test_exact_match_and_completion_loss(tok):
    lm = chat_llama()
    questions = [[user("Capital of France?")], [SYSTEM, user("2+2?")], [user("Colour of sky?")]]
    said = [g.text for g in generate(lm, tok, questions, max_new_tokens=6)]
    data = [
        {"messages": questions[0] + [bot("  " + said[0].upper() + " ")]},  # the model's words
        {"messages": questions[1], "answer": said[1].swapcase()},
        {"messages": questions[2] + [bot("certainly not this")]},
    ]
    result = evaluate_generation(lm, tok, data, max_new_tokens=6, batch_size=2)
    assert result.metrics["exact_match"] == pytest.approx(2 / 3)
    assert [r["exact_match"] for r in result.predictions] == [True, True, False]
    assert [r["prediction"] for r in result.predictions] == said
    refs = [chat_reference(e) for e in data]
    pairs = [completion_ids(tok, p, [bot(a)]) for p, a in refs]
    loss, per = _full_logits_loss(lm, tok, pairs)
    assert result.metrics["completion_loss"] == pytest.approx(loss, abs=1e-5)
    assert [r["loss"] for r in result.predictions] == pytest.approx(per, abs=1e-5)
    assert result.metrics["n"] == 3


def test_only_the_answer_positions_get_logits(tok):
    lm = chat_llama()
    seen = []
    hook = lm.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    long_prompt = [user("word " * 200)]
    pairs = [completion_ids(tok, long_prompt, [bot("yes")]),
             completion_ids(tok, [user("hi")], [bot("a longer answer here")])]
    try:
        logps = completion_logprobs(lm, pairs, batch_size=2, pad=tok.pad_token_id)
    finally:
        hook.remove()
    k = max(len(c) for _, c in pairs)
    assert seen == [(2, k + 1, len(tok))]  # not (2, 200+ prompt tokens, vocabulary)
    assert [lp.shape[0] for lp in logps] == [len(c) for _, c in pairs]


def _sum_logp(lm, pair):
    p, c = pair
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([p + c])).logits[0]
    return float(torch.log_softmax(logits[len(p) - 1:-1], -1).gather(
        -1, torch.tensor(c)[:, None]).sum())


def test_reward_accuracy_by_hand(tok):
    lm = lora_model(names=("pol",))
    dt.set_active(lm, "pol")
    data = [
        {"prompt": [user("Capital of France?")], "chosen": [bot("Paris")],
         "rejected": [bot("London")]},
        {"prompt": [SYSTEM, user("2+2?")], "chosen": [bot("Four")], "rejected": [bot("Five")]},
        {"prompt": [user("Sky?")], "chosen": [bot("Blue")], "rejected": [bot("Green, surely")]},
    ]
    beta = 0.5
    got = reward_accuracy(lm, tok, data, beta, batch_size=4)
    rewards, likelier = [], []
    for e in data:
        pair, logps = [], []
        for side in ("chosen", "rejected"):
            ids = completion_ids(tok, e["prompt"], e[side])
            policy = _sum_logp(lm, ids)
            with dt.disabled(lm):
                ref = _sum_logp(lm, ids)
            pair.append(beta * (policy - ref))
            logps.append(policy)
        rewards.append(pair)
        likelier.append(logps[0] > logps[1])
    for row, (c, r) in zip(got.predictions, rewards):
        assert row["chosen_reward"] == pytest.approx(c, abs=1e-4)
        assert row["rejected_reward"] == pytest.approx(r, abs=1e-4)
        assert row["correct"] == (c > r)
    assert got.metrics["reward_accuracy"] == pytest.approx(sum(c > r for c, r in rewards) / 3)
    assert got.metrics["logprob_accuracy"] == pytest.approx(sum(likelier) / 3)
    swapped = [{**e, "chosen": e["rejected"], "rejected": e["chosen"]} for e in data]
    flipped = reward_accuracy(lm, tok, swapped, beta).metrics
    assert flipped["reward_accuracy"] == pytest.approx(1 - got.metrics["reward_accuracy"])
    assert flipped["reward_margin"] == pytest.approx(-got.metrics["reward_margin"], abs=1e-5)
    dt.set_active(lm, [])  # no delta: policy = reference, every reward 0, every pair a miss
    none = reward_accuracy(lm, tok, data, beta).metrics
    assert none["reward_accuracy"] == 0 and none["reward_margin"] == 0


def test_routed_evaluation_follows_the_adapter_field(tok):
    lm = lora_model()
    data = [{"messages": [user(q), bot("x")], "adapter": a}
            for q, a in [("hi", "a"), ("Tell me a story.", "b"), ("ok", None)]]
    routed = evaluate_generation(lm, tok, data, max_new_tokens=5)
    for ex, row in zip(data, routed.predictions):
        dt.set_active(lm, [] if ex["adapter"] is None else ex["adapter"])
        alone = evaluate_generation(lm, tok, [{"messages": ex["messages"]}], max_new_tokens=5)
        assert row["prediction"] == alone.predictions[0]["prediction"]
        assert row["loss"] == pytest.approx(alone.predictions[0]["loss"], abs=1e-5)
    dt.set_active(lm, [])


# -- deltatune eval on chat and preference files --------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    return build_tiny_dir(tmp_path_factory.mktemp("lm"), tok)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps({**r, "split": "test"}) + "\n" for r in rows))
    return path


def test_cli_eval_chat_writes_predictions(tiny_dir, tmp_path, capsys, tok):
    from deltatune.cli.app import main
    from deltatune.data import load_data
    from deltatune.models import load_model

    rows = [{"messages": [user(q), bot(a)]} for q, a in
            [("Capital of France?", "Paris"), ("2+2?", "4"), ("Sky colour?", "blue")]]
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    rc = main(["eval", "--model", str(tiny_dir / "tiny-chat"), "--data", str(data),
               "--max-new-tokens", "5", "--out", str(tmp_path / "ev")])
    assert rc == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    lines = (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()
    preds = [json.loads(x) for x in lines]
    assert results["n"] == len(preds) == 3 and results["adapter"] is None
    assert "predictions" not in results
    entry = load_model(str(tiny_dir / "tiny-chat"))
    test = load_data(str(data), "test")
    want = evaluate_generation(entry.model, tok, test.examples, max_new_tokens=5)
    assert results["exact_match"] == want.metrics["exact_match"]
    assert results["completion_loss"] == pytest.approx(want.metrics["completion_loss"], abs=1e-5)
    assert [p["prediction"] for p in preds] == [p["prediction"] for p in want.predictions]


def test_cli_eval_preference_reward_accuracy(tiny_dir, tmp_path, capsys, tok):
    from deltatune.cli.app import main
    from deltatune.data import load_data
    from deltatune.models import load_model

    rows = [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in
            [("Capital of France?", "Paris", "Rome"), ("2+2?", "4", "5"),
             ("Sky colour?", "blue", "green"), ("Opposite of hot?", "cold", "warm")]]
    data = _write_jsonl(tmp_path / "pref.jsonl", rows)
    adapter = tiny_dir / "adapter-b"
    rc = main(["eval", "--model", str(tiny_dir / "tiny-chat"), "--adapter", str(adapter),
               "--data", str(data), "--out", str(tmp_path / "ev")])
    assert rc == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    entry = load_model(str(tiny_dir / "tiny-chat"))
    dt.load_adapter(entry.model, adapter)
    want = reward_accuracy(entry.model, tok, load_data(str(data), "test").examples, 0.1)
    assert results["reward_accuracy"] == want.metrics["reward_accuracy"]
    assert results["reward_margin"] == pytest.approx(want.metrics["reward_margin"], abs=1e-5)
    assert len((tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()) == 4


def test_cli_eval_needs_an_adapter_or_a_model(tmp_path, capsys):
    from deltatune.cli.app import main

    rc = main(["eval", "--data", "bbc-news-chat", "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: pass --adapter DIR, or --model NAME to evaluate the "
                               "untuned model"]


def test_cli_eval_uses_the_adapters_chat_template(tiny_dir, tmp_path, capsys, tok):
    import shutil

    from deltatune.cli.app import main
    from deltatune.data import load_data
    from deltatune.models import load_model

    template = tmp_path / "plain.jinja"  # no default system turn, unlike SmolLM2's own
    template.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                        "assistant\n{% endif %}")
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_dir / "adapter-c", adapter)
    (adapter / "task.json").write_text(json.dumps(
        {"model": str(tiny_dir / "tiny-chat"), "chat_template": str(template)}))
    data = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [user("2+2?"), bot("4")]},
                                                  {"messages": [user("Sky?"), bot("blue")]}])
    rc = main(["eval", "--adapter", str(adapter), "--data", str(data), "--max-new-tokens", "4",
               "--out", str(tmp_path / "ev")])
    assert rc == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    entry = load_model(str(tiny_dir / "tiny-chat"))
    dt.load_adapter(entry.model, adapter)
    examples = load_data(str(data), "test").examples
    want = evaluate_generation(entry.model, tok, examples, max_new_tokens=4,
                               template=template.read_text())
    other = evaluate_generation(entry.model, tok, examples, max_new_tokens=4)
    assert results["completion_loss"] == pytest.approx(want.metrics["completion_loss"], abs=1e-5)
    assert want.metrics["completion_loss"] != pytest.approx(other.metrics["completion_loss"])
