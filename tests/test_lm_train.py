"""SFT and DPO through the trainer (fit) and `deltatune train` on a tiny Llama with SmolLM2's
tokenizer: the loss falls, the chunked path never builds whole-batch logits, results.json holds the
objective and the collate's counts, and bad combinations are refused before --out exists."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_lm import smol_tokenizer, tiny_chat_llama

import deltatune as dt
from deltatune.cli.app import main
from deltatune.lm.tokenize import chat_collate, preference_collate
from deltatune.models.text import CausalLM
from deltatune.train import TrainConfig, TrainError, evaluate, fit

COLORS = ["red", "green", "blue", "black"]


def _chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Question {i}: name color number {i % 4}."},
                         {"role": "assistant", "content": COLORS[i % 4]}]}


def _pair(i: int) -> dict:
    """Red or green preferred over blue or black, whatever the prompt (a random tiny model cannot
    read the prompt's number, so the preference must not depend on it)."""
    return {"prompt": [{"role": "user", "content": f"Question {i}: name color number {i % 4}."}],
            "chosen": [{"role": "assistant", "content": COLORS[i % 2]}],
            "rejected": [{"role": "assistant", "content": COLORS[2 + i % 2]}]}


def _model(seed: int = 0) -> CausalLM:
    model = CausalLM(tiny_chat_llama(seed=seed))
    dt.attach(model, dt.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj", "o_proj", "lm_head"]),
              name="default")
    return model


def _cfg(**kw) -> TrainConfig:
    base = {"epochs": 4, "batch_size": 4, "lr": 3e-2, "progress": False, "warmup_ratio": 0.0}
    return TrainConfig(**{**base, **kw})


def test_sft_loss_falls_and_evaluation_is_chunked(monkeypatch):
    model = _model()
    collate = chat_collate(smol_tokenizer(), 64)
    train, val = [_chat(i) for i in range(16)], [_chat(i) for i in range(16, 24)]
    before = evaluate(model, val, collate, task="causal-lm", batch_size=4)
    # the chunked path never asks the model for logits: forward(..., return_hidden=True) only
    calls = []
    forward = CausalLM.forward

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("return_hidden", False))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CausalLM, "forward", spy)
    res = fit(model, train, collate, _cfg(), eval_data=val, task="causal-lm")
    after = evaluate(model, val, collate, task="causal-lm", batch_size=4)
    assert calls and all(calls)
    assert after["loss"] < before["loss"] - 1.0
    assert after["tokens"] == before["tokens"] > 0 and 0 <= after["token_accuracy"] <= 1
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    assert res.best["loss"] == pytest.approx(after["loss"], abs=1e-5)
    assert collate.stats["examples"] > 0 and collate.stats["truncated"] == 0


def test_packed_sft_trains():
    model = _model(1)
    collate = chat_collate(smol_tokenizer(), 96, packing=True)
    train = [_chat(i) for i in range(16)]
    before = evaluate(model, train, collate, task="causal-lm")
    fit(model, train, collate, _cfg(epochs=3), task="causal-lm")
    after = evaluate(model, train, collate, task="causal-lm")
    assert collate.stats["rows"] > 0 and after["loss"] < before["loss"] - 1.0


def test_dpo_learns_the_preference_and_records_rewards():
    model = _model(2)
    collate = preference_collate(smol_tokenizer(), 64)
    train, val = [_pair(i) for i in range(16)], [_pair(i) for i in range(16, 24)]
    cfg = _cfg(objective="dpo", dpo_beta=0.5, epochs=3)
    before = evaluate(model, val, collate, task="causal-lm", objective=cfg)
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference
    res = fit(model, train, collate, cfg, eval_data=val, task="causal-lm")
    after = evaluate(model, val, collate, task="causal-lm", objective=cfg)
    assert after["loss"] < 0.5 and after["reward_accuracy"] == 1.0 and after["pairs"] == 8
    last = res.best
    assert last["reward_margin"] > 0 and last["rewards_chosen"] > last["rewards_rejected"]
    steps = json.loads(json.dumps(res.final))  # JSON-able
    assert "reward_accuracy" in steps


def test_objective_options_are_checked():
    with pytest.raises(TrainError, match="TrainConfig.objective='ppo'"):
        TrainConfig(objective="ppo")
    with pytest.raises(TrainError, match="TrainConfig.dpo_loss='kto' must be one of sigmoid"):
        TrainConfig(dpo_loss="kto")
    with pytest.raises(TrainError, match="TrainConfig.dpo_beta"):
        TrainConfig(dpo_beta=-1.0)
    for bad in (-1.0, float("nan"), "1"):
        with pytest.raises(TrainError, match="TrainConfig.rpo_alpha=.* must be a finite number"):
            TrainConfig(rpo_alpha=bad)
    with pytest.raises(TrainError, match="objective='sft' trains causal LMs"):
        fit(torch.nn.Linear(2, 2), [0], lambda b: {}, TrainConfig(objective="sft"))


# -- the CLI on a tiny model directory ------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    model = tiny_chat_llama(seed=4)
    tok = smol_tokenizer()
    model.save_pretrained(tmp / "tiny")
    tok.save_pretrained(tmp / "tiny")
    bare = tmp / "bare"  # the same model, its tokenizer without a chat template
    model.save_pretrained(bare)
    template = tok.chat_template
    tok.chat_template = None
    try:
        tok.save_pretrained(bare)
    finally:
        tok.chat_template = template
    (tmp / "template.jinja").write_text(template)
    write = lambda name, rows: (tmp / name).write_text(  # noqa: E731
        "".join(json.dumps(r) + "\n" for r in rows))
    write("chat.jsonl", [_chat(i) for i in range(40)])
    write("pref.jsonl", [{"prompt": f"Question {i}: name a color.", "chosen": COLORS[i % 2],
                          "rejected": COLORS[2 + i % 2]} for i in range(40)])
    write("labels.jsonl", [{"text": f"color {i % 4}", "label": COLORS[i % 4]} for i in range(40)])
    return tmp


def _train(files, out, data, *extra) -> int:
    new = [] if "--from-adapter" in extra else ["--rank", "4"]  # that adapter's own rank
    return main(["train", "--model", str(files / "tiny"), "--data", str(files / data),
                 "--max-steps", "3", "--lr", "1e-2", *new, "--out", str(out), *extra])


def test_cli_sft_then_dpo_from_the_adapter(files, tmp_path):
    sft = tmp_path / "sft"
    assert _train(files, sft, "chat.jsonl", "--max-length", "48", "--packing") == 0
    results = json.loads((sft / "results.json").read_text())
    assert results["objective"] == "sft" and results["train"]["steps"] == 3
    assert results["collate_stats"]["examples"] > 0 and "truncated" in results["collate_stats"]
    assert results["test"]["tokens"] > 0 and math.isfinite(results["test"]["loss"])
    config = json.loads((sft / "metrics.json").read_text())["config"]
    assert config["batch_size"] == 8 and config["objective"] == "auto"  # the causal-LM defaults
    assert config["eval_batch_size"] == 16
    assert config["gradient_checkpointing"] is True
    task = json.loads((sft / "adapter" / "task.json").read_text())
    assert task["objective"] == "sft" and task["max_length"] == 48

    dpo = tmp_path / "dpo"
    assert _train(files, dpo, "pref.jsonl", "--from-adapter", str(sft / "adapter"),
                  "--objective", "dpo", "--beta", "0.2", "--dpo-loss", "ipo",
                  "--no-gradient-checkpointing") == 0
    config = json.loads((dpo / "metrics.json").read_text())["config"]
    assert config["gradient_checkpointing"] is False
    results = json.loads((dpo / "results.json").read_text())
    assert results["objective"] == "dpo" and results["from_adapter"] == str(sft / "adapter")
    assert set(results["test"]) >= {"loss", "reward_accuracy", "rewards_chosen", "pairs"}
    steps = json.loads((dpo / "metrics.json").read_text())["steps"]
    assert "reward_accuracy" in steps[0] and "rewards_chosen" in steps[0]
    # the policy started at the SFT adapter, which is also the reference: IPO's loss at zero
    # margin is (1 / (2 beta))^2
    assert steps[0]["loss"] == pytest.approx((1 / 0.4) ** 2, rel=1e-4)
    assert steps[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)


def test_cli_dpo_with_rpo_alpha(files, tmp_path):
    """--rpo-alpha adds the chosen answers' NLL: at the first step the policy is the reference
    (a new adapter), so the loss is log 2 + alpha x nll_chosen."""
    out = tmp_path / "rpo"
    assert _train(files, out, "pref.jsonl", "--rpo-alpha", "0.5") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["rpo_alpha"] == 0.5
    first = metrics["steps"][0]
    assert first["nll_chosen"] > 0.1
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["nll_chosen"], rel=1e-4)
    test = json.loads((out / "results.json").read_text())["test"]
    assert test["nll_chosen"] > 0 and math.isfinite(test["loss"])


@pytest.mark.parametrize(
    "model, data, extra, message",
    [
        ("tiny", "chat.jsonl", ["--objective", "dpo"], "--objective dpo needs preference data"),
        ("tiny", "pref.jsonl", ["--objective", "sft"], "holds preference pairs"),
        ("tiny", "labels.jsonl", ["--objective", "sft"], "trains causal language models"),
        ("bare", "chat.jsonl", [], "has no chat template; pass one with --chat-template"),
        ("tiny", "chat.jsonl", ["--dpo-loss", "kto"], "TrainConfig.dpo_loss='kto'"),
        ("tiny", "pref.jsonl", ["--rpo-alpha", "-1"], "TrainConfig.rpo_alpha=-1.0 must be"),
        ("tiny", "pref.jsonl", ["--from-adapter", "nowhere"], "is not an adapter directory"),
        ("tiny", "pref.jsonl", ["--from-adapter", ".", "--rank", "2"], "drop --method/--rank"),
        ("tiny", "labels.jsonl", ["--packing"], "--chat-template and --packing apply"),
        ("tiny", "chat.jsonl", ["--max-length", "8"], "truncates away the answer of every one"),
    ],
)
def test_cli_refuses_before_out_exists(files, tmp_path, capsys, model, data, extra, message):
    out = tmp_path / "run"
    rc = main(["train", "--model", str(files / model), "--data", str(files / data),
               "--max-steps", "1", "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and err and err[-1].startswith("error:") and message in err[-1], err
    assert not out.exists()


def test_cli_chat_template_file_for_a_model_without_one(files, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", str(files / "bare"), "--data", str(files / "chat.jsonl"),
                 "--max-steps", "1", "--chat-template", str(files / "template.jinja"),
                 "--out", str(out)]) == 0
    task = json.loads((out / "adapter" / "task.json").read_text())
    assert task["chat_template"] == str(files / "template.jinja")


def test_cli_export_of_an_lm_adapter_loads_in_transformers_with_the_same_logits(files, tmp_path):
    """SFT on a tiny Llama, then `deltatune export`: transformers loads the merged directory by
    itself (AutoModelForCausalLM + its tokenizer and chat template) and gives the logits of the
    base model with the adapter."""
    import transformers

    run = tmp_path / "sft"
    assert _train(files, run, "chat.jsonl", "--max-length", "48") == 0
    merged = tmp_path / "merged"
    assert main(["export", "--adapter", str(run / "adapter"), "--out", str(merged)]) == 0
    lm = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    assert tok.chat_template == smol_tokenizer().chat_template
    ids = torch.tensor([tok("Question 3: name color number 3.")["input_ids"]])

    model = CausalLM(transformers.AutoModelForCausalLM.from_pretrained(files / "tiny")).eval()
    dt.load_adapter(model, run / "adapter", name="default")
    with torch.no_grad():
        want, got = model(ids), lm(input_ids=ids).logits
        base = CausalLM(transformers.AutoModelForCausalLM.from_pretrained(files / "tiny"))(ids)
    assert (want - base).abs().max() > 1e-4  # the adapter moved the outputs
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
