"""Prompt tuning (soft prompts), and what it shares with prefix tuning (peft's prompt-learning
layout, the targets). The virtual-token host both use is engine surgery, in
:mod:`deltatune.core.virtual`.

Function: ``n`` trained embedding vectors prepended to the input sequence; the attention mask is
extended so every real token sees them. Position: the input embedding of a transformers model
(BERT-family ``word_embeddings``, Llama-family ``embed_tokens``). The frozen model is unchanged,
so nothing folds into the weights (``dt.merge`` refuses while a prompt is active).

The prompt's positions are cut from the backbone's ``last_hidden_state`` (and ``hidden_states``):
shapes, labels and pooling over the attention mask stay those of the base model. A BERT pooler
still reads position 0, which is then the first virtual token (as in peft).

Paper: Lester et al., https://arxiv.org/abs/2104.08691
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import torch
from torch import nn

from ..core.errors import DeltaFileError
from ..core.example import Example
from ..core.host import Host
from ..core.peft_layout import PeftLayout
from ..core.spec import DeltaSpec, register
from ..core.virtual import VirtualTokenHost, VirtualTokens, add_virtual_tokens

EMBEDDING_TARGETS = (("word_embeddings",), ("embed_tokens",), ("wte",), ("embed_in",))
_TASKS = (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
          ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def inject_virtual(
    spec: DeltaSpec, model: nn.Module, name: str,
    build: Callable[[VirtualTokenHost], VirtualTokens],
) -> list[str]:
    """Add a virtual-token delta at the model's single input embedding (prompt and prefix), with
    peft's task type for the model's class recorded on it (peft picks its forward by it)."""
    model_class = type(model).__name__
    task = next((t for suffix, t in _TASKS if model_class.endswith(suffix)), "FEATURE_EXTRACTION")

    def build_part(host: VirtualTokenHost) -> VirtualTokens:
        part = build(host)
        part.peft_task = task
        return part

    return add_virtual_tokens(spec, model, name, build_part)


class PromptLayout(PeftLayout):
    """peft's prompt-learning layout (prompt and prefix tuning): the delta's one tensor at the
    file's root as ``prompt_embeddings`` (its ``table()``: the prompt, or prefix tuning's final
    key/values), trainable modules under ``base_model.``; the config's shared fields here, each
    method's (the table's width, its own options) from ``write``."""

    def config(self, spec: DeltaSpec, deltas: dict[str, Any]) -> dict[str, Any]:
        self.check_saving(spec, deltas)
        part = next(iter(deltas.values()))
        return {
            "peft_type": self.peft_type, "task_type": part.peft_task,
            "num_virtual_tokens": part.num_tokens, "num_transformer_submodules": 1,
            "num_layers": getattr(part, "layers", None), **self.write(spec, deltas),
            "inference_mode": True, "modules_to_save": None, "base_model_name_or_path": None,
            "revision": None, **self.fixed,
        }

    def spec(self, cls: type[DeltaSpec], config: Mapping[str, Any], targets: list[str]
             ) -> DeltaSpec:
        if (config.get("num_transformer_submodules") or 1) != 1:
            raise DeltaFileError(
                "the peft adapter is for an encoder-decoder model (num_transformer_submodules=2); "
                "deltatune's prompt and prefix tuning support encoder-only and decoder-only models"
            )
        saved = tuple(config.get("modules_to_save") or ())
        return cls(num_virtual_tokens=int(config["num_virtual_tokens"]), trainable_modules=saved)

    def save(self, delta: Any, host: Host) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": delta.table().detach()}

    def load(self, delta: Any, host: Host, tensors: dict[str, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
        if set(tensors) != {"prompt_embeddings"}:
            raise DeltaFileError(
                "a peft prompt-learning file holds one 'prompt_embeddings' tensor, found "
                f"{sorted(tensors)}"
            )
        return {self.tensors[0].name: tensors["prompt_embeddings"]}


def _prompt_width(spec: DeltaSpec, deltas: dict[str, Any]) -> dict[str, Any]:
    part = next(iter(deltas.values()))
    return {"token_dim": part.prompt.shape[1], "num_attention_heads": part.heads}


# -- prompt tuning --------------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class PromptTuning(DeltaSpec):
    """Soft prompt of ``num_virtual_tokens`` vectors. ``init``: ``"random"`` (normal, at the scale
    of the model's embeddings), ``"vocab"`` (embeddings of random vocabulary tokens) or ``"text"``
    (embeddings of ``init_text``'s tokens, repeated to length; tokenised once with the local
    ``tokenizer`` directory and kept as ``init_token_ids``, so loading needs no tokenizer)."""

    method = "prompt"
    example = Example(dict(num_virtual_tokens=3), model="transformer", identity_at_init=False,
                      merges=False, bad=(({"num_virtual_tokens": 0}, "num_virtual_tokens"),))
    host_kinds = ("embedding",)
    default_targets = EMBEDDING_TARGETS
    peft = PromptLayout(
        "PROMPT_TUNING", tensors=("prompt",), root_tensors=True, write=_prompt_width,
        fixed={"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
               "tokenizer_name_or_path": None, "tokenizer_kwargs": None})

    num_virtual_tokens: int = 20
    init: Literal["random", "vocab", "text"] = "random"
    init_text: str | None = None
    tokenizer: str | None = None
    init_token_ids: tuple[int, ...] = ()

    def validate(self) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            self.fail("num_virtual_tokens", "must be a positive integer")
        if self.init != "text":
            if self.init_text is not None or self.init_token_ids:
                self.fail("init", "must be 'text' when init_text or init_token_ids is given")
            return
        if not self.init_token_ids:
            if not self.init_text:
                self.fail("init_text", "must be a non-empty text when init='text'")
            object.__setattr__(self, "init_token_ids", tuple(_tokenize(self)))
        if any(not isinstance(i, int) or i < 0 for i in self.init_token_ids):
            self.fail("init_token_ids", "must be non-negative token ids")

    def inject(self, model: nn.Module, name: str) -> list[str]:
        """Virtual input tokens before the embeddings: not a delta on a module's output, so it goes
        through the virtual-token host instead of the engine's DeltaHost surgery."""
        return inject_virtual(self, model, name, lambda host: SoftPrompt(self, host))


def _tokenize(spec: PromptTuning) -> list[int]:
    if not spec.tokenizer:
        spec.fail("tokenizer", "must name a local tokenizer directory when init='text' "
                               "(or pass init_token_ids)")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec.tokenizer, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - every loader failure has the same fix
        spec.fail("tokenizer", f"could not be loaded ({type(exc).__name__}); pass a local one")
    ids = tok(spec.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        spec.fail("init_text", "gives no tokens")
    return list(ids)


class SoftPrompt(VirtualTokens):
    """``prompt``: ``(num_virtual_tokens, hidden)`` trained embeddings."""

    kind = "prompt"
    peft_task: str = "FEATURE_EXTRACTION"  # peft's task_type for the model's class, set on attach

    def __init__(self, spec: PromptTuning, host: VirtualTokenHost) -> None:
        super().__init__(spec)
        weight = host.base.weight
        vocab, hidden = weight.shape
        self.num_tokens = n = spec.num_virtual_tokens
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        with torch.no_grad():
            if spec.init == "random":
                init = torch.randn(n, hidden, dtype=dtype) * weight.float().std().item()
            else:
                if spec.init == "vocab":
                    ids = torch.randint(0, vocab, (n,))
                elif max(spec.init_token_ids) >= vocab:
                    spec.fail("init_token_ids", f"hold ids beyond the vocabulary ({vocab}); "
                                                "use the model's own tokenizer")
                else:
                    ids = torch.tensor((list(spec.init_token_ids) * n)[:n])
                init = weight.detach()[ids.to(weight.device)].to(dtype)
        self.prompt = nn.Parameter(init.to(weight.device).clone())
        cfg = host.config  # recorded in peft's config (informative there)
        self.layers = getattr(cfg, "num_hidden_layers", None)
        self.heads = getattr(cfg, "num_attention_heads", None)

    def values(self) -> torch.Tensor:
        return self.prompt

    def table(self) -> torch.Tensor:
        """``(n, hidden)``: the prompt, as peft stores it."""
        return self.prompt
