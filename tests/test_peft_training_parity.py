"""Training parity with the real peft: from the same initial weights, deltatune's LoRA and peft's
LoRA, trained by the same trainer on the same batches, end with the same weights and the same
predictions.

This is what makes "deltatune LoRA vs peft LoRA" in ``bench/bench_accuracy.py`` a comparison of the
implementations: with identical starting ``A`` matrices the two runs are the same computation, so
any gap left between independently drawn runs is the draw of ``A``.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

import deltatune as dt
from deltatune.train import TrainConfig, evaluate, fit

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _data(n: int, seed: int) -> list[dict]:
    """Ragged token sequences; the label is the token range (of three) most tokens fall in."""
    gen = random.Random(seed)
    out = []
    for _ in range(n):
        label = gen.randrange(3)
        ids = [1 + 33 * label + gen.randrange(33) if gen.random() < 0.7 else gen.randrange(1, 100)
               for _ in range(gen.randrange(5, 12))]
        out.append({"ids": ids, "label": label})
    return out


def _collate(batch: list[dict]) -> dict:
    width = max(len(e["ids"]) for e in batch)
    ids = torch.tensor([e["ids"] + [0] * (width - len(e["ids"])) for e in batch])
    return {
        "input_ids": ids,
        "attention_mask": (ids != 0).long(),
        "labels": torch.tensor([e["label"] for e in batch]),
    }


def _pair():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=3,
    )  # dropout left on: both runs draw the same masks
    base = transformers.BertForSequenceClassification(cfg)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    dt.attach(
        ours, dt.LoRA(r=4, alpha=8, targets=["query", "value"], trainable_modules=["classifier"])
    )
    theirs.bert = peft.get_peft_model(
        theirs.bert, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    )
    theirs.classifier.requires_grad_(True)
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    peft_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    return ours, theirs, mine, peft_params


def _matched(mine: dict, peft_params: dict, kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # both name their tensors layer by layer, query before value: the sorted names line up
    a = sorted(n for n in mine if kind in n)
    b = sorted(n for n in peft_params if kind in n)
    assert len(a) == len(b) > 0
    return [(mine[x], peft_params[y]) for x, y in zip(a, b)]


def test_lora_training_matches_peft_from_the_same_init():
    ours, theirs, mine, peft_params = _pair()
    assert (
        len(mine) == len(peft_params) == 2 * 2 * 2 + 2
    )  # A, B on query and value of 2 layers + head
    with torch.no_grad():  # the only random draw that differs: peft's A matrices go into ours
        for x, y in _matched(mine, peft_params, "lora_A"):
            x.copy_(y)
    train, test = _data(96, 0), _data(48, 1)
    cfg = TrainConfig(
        epochs=2,
        batch_size=16,
        lr=3e-3,
        seed=0,
        progress=False,
        eval_each_epoch=False,
        keep_best=False,
    )
    for model in (ours, theirs):
        fit(model, train, _collate, cfg)
    for kind in ("lora_A", "lora_B", "classifier"):
        for x, y in _matched(mine, peft_params, kind):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    moved = max(x.abs().max().item() for x, _ in _matched(mine, peft_params, "lora_B"))
    assert moved > 1e-3, "B left zero: nothing was trained, so equality would prove nothing"
    got = [evaluate(m, test, _collate, task="text-classification") for m in (ours, theirs)]
    assert got[0]["accuracy"] == got[1]["accuracy"]
    assert got[0]["loss"] == pytest.approx(got[1]["loss"], rel=1e-5)


def test_independent_draws_differ():
    """Without the copy the two start from different A matrices: the comparison above is not
    vacuous."""
    _, _, mine, peft_params = _pair()
    assert any(not torch.equal(x, y) for x, y in _matched(mine, peft_params, "lora_A"))
