"""peft adapters saved for sequence classification (``task_type="SEQ_CLS"``): peft lists both of its
candidate heads, ``modules_to_save=["classifier", "score"]``, whatever the model has; deltatune
keeps the ones with tensors in the file, so they load and match peft's logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import deltatune as dt

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(0))


def _bert_cls():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


CONFIGS = {
    "lora": lambda: peft.LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        init_lora_weights=False,
    ),
    "adalora": lambda: peft.AdaLoraConfig(
        task_type="SEQ_CLS",
        init_r=4,
        target_r=2,
        total_step=10,
        target_modules=["query", "value"],
        init_lora_weights=False,
    ),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_seq_cls_adapter_loads_and_matches_peft(tmp_path, kind):
    base = _bert_cls()
    pm = peft.get_peft_model(copy.deepcopy(base), CONFIGS[kind]()).eval()
    with torch.no_grad():  # a trained head: the copy peft saves must be the one that is loaded
        for p in pm.base_model.model.classifier.modules_to_save["default"].parameters():
            p.add_(torch.randn_like(p))
        if kind == "adalora":  # lora_E starts at zero in peft: give the singular values something
            for n, p in pm.named_parameters():
                if "lora_E" in n:
                    p.copy_(torch.randn_like(p))
    y_peft = _logits(pm)
    assert (y_peft - _logits(base)).abs().max() > 1e-2
    pm.save_pretrained(tmp_path / "seqcls")
    saved = json.loads((tmp_path / "seqcls" / "adapter_config.json").read_text())
    assert {"classifier", "score"} <= set(saved["modules_to_save"]), (
        "peft lists both candidate heads"
    )

    ours = copy.deepcopy(base)
    dt.load_adapter(ours, tmp_path / "seqcls")
    assert dt.get_spec(ours, "default").trainable_modules == ("classifier",), (
        "only the saved head is kept"
    )
    assert (_logits(ours) - y_peft).abs().max().item() < 1e-5
