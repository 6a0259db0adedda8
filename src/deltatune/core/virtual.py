"""The virtual-token host: deltas that add positions to a transformers model's input sequence.

A :class:`VirtualTokens` delta adds ``n`` virtual tokens, either as embeddings prepended to the
input (``kind="prompt"``) or as key/value prefixes of every attention layer (``kind="prefix"``).
The :class:`VirtualTokenHost` stands in for the input embedding and does the surgery on each call
of the backbone (the embedding's nearest ancestor taking ``inputs_embeds`` and
``attention_mask``): sequences, attention mask, ``token_type_ids`` and ``position_ids`` grow by the
virtual tokens, and the prompt positions are cut from the output again. It knows no method:
prompt tuning, prefix tuning and the composites that use them (methods/prompt.py, prefix.py,
unified.py) each build their delta and call :func:`add_virtual_tokens`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from .delta import Delta
from .errors import StateError, TargetError
from .host import Host, get_module, set_module
from .spec import DeltaSpec
from .targets import select_targets


class VirtualTokens(Delta):
    """A delta of ``num_tokens`` virtual tokens: a soft prompt (``kind="prompt"``, values
    ``(n, hidden)``) or per-layer key/value prefixes (``kind="prefix"``, values
    ``(layers·2, kv_heads, n, head_dim)``)."""

    kind: ClassVar[str] = ""
    num_tokens: int

    def values(self) -> torch.Tensor:
        raise NotImplementedError


class VirtualTokenHost(Host):
    """Stands in for the input embedding (returning its output unchanged) and holds the virtual-
    token deltas. Hooks on the *backbone* (the module whose ``forward`` takes ``inputs_embeds`` and
    ``attention_mask``) add the active ones to each call: prompts are prepended to
    ``inputs_embeds``, prefixes enter as a pre-filled key/value cache, and the mask,
    ``token_type_ids`` and ``position_ids`` are extended to match."""

    def __init__(self, base: nn.Module, backbone: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.parts = nn.ModuleDict()
        self.disabled = False
        self._active: list[str] = []
        self._route: tuple[torch.Tensor, list[str]] | None = None
        # The backbone is an ancestor: keep only what the hooks need (registering it would loop).
        self.config = getattr(backbone, "config", None)
        self._arg_names = list(inspect.signature(backbone.forward).parameters)
        self._strip = 0  # prompt positions to cut from the output of the current call
        self._cached = 0  # virtual tokens put into the key/value cache at its first step
        self._hooks = [
            backbone.register_forward_pre_hook(self._before, with_kwargs=True),
            backbone.register_forward_hook(self._after, with_kwargs=True),
        ]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base(*args, **kwargs)

    # -- Host contract --------------------------------------------------------------------------
    def delta_names(self) -> list[str]:
        return list(self.parts.keys())

    def part(self, name: str) -> VirtualTokens:
        return self.parts[name]

    def set_active(self, names: Sequence[str]) -> None:
        self._active = [n for n in names if n in self.parts]

    def set_route(self, slots: torch.Tensor | None, names: Sequence[str]) -> None:
        if slots is None or not any(n in self.parts for n in names):
            self._route = None
            return
        if any(n not in self.parts for n in names) or bool((slots < 0).any()):
            raise StateError(
                "a routed batch with prompt/prefix deltas must send every sample to one of them "
                "(no None, no other methods) since sequence lengths differ; route those apart"
            )
        shapes = {(self.parts[n].kind, self.parts[n].num_tokens) for n in names}
        if len(shapes) > 1:
            raise StateError(
                "routed prompt/prefix deltas must share kind and num_virtual_tokens, got "
                f"{sorted(shapes)}"
            )
        self._route = (slots, list(names))

    def remove(self, name: str) -> None:
        del self.parts[name]
        self._active = [n for n in self._active if n != name]
        if not self.parts:
            self.remove_hooks()

    def remove_hooks(self) -> None:
        while self._hooks:
            self._hooks.pop().remove()

    def merge(self) -> list[str]:
        if self._active:
            name = self._active[0]
            raise StateError(
                f"delta {name!r} ({self.parts[name].spec.method}) cannot be merged into the "
                "weights; deactivate it before merging or keep it unmerged"
            )
        return []

    # -- what the current call adds ---------------------------------------------------------------
    def _tokens(self, kind: str, batch: int) -> torch.Tensor | None:
        """Values of the chosen deltas of ``kind`` with a batch dimension: prompts
        ``(B, n, hidden)``, prefixes ``(layers·2, B, kv_heads, n, head_dim)``."""
        if self._route is not None:
            slots, names = self._route
            if slots.shape[0] != batch:
                raise StateError(
                    f"route() was given {slots.shape[0]} entries but the batch has {batch} "
                    "samples; pass one delta name per sample"
                )
            if self.parts[names[0]].kind != kind:
                return None
            picked = torch.stack([self.parts[n].values() for n in names])[slots]  # (B, ...)
            return picked if kind == "prompt" else picked.transpose(0, 1)
        chosen = [self.parts[n].values() for n in self._active if self.parts[n].kind == kind]
        if not chosen:
            return None
        if kind == "prompt":  # several prompts: concatenated in activation order
            return torch.cat(chosen, 0).unsqueeze(0).expand(batch, -1, -1)
        kv = torch.cat(chosen, 2)  # (layers·2, kv_heads, n, head_dim)
        return kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.disabled or (not self._active and self._route is None):
            return None
        kw = dict(zip(self._arg_names, args))
        kw.update(kwargs)
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        ref = embeds if embeds is not None else ids
        if ref is None:
            return None
        batch = ref.shape[0]
        cache = kw.get("past_key_values")
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            added = self._cached  # a later generation step: the cache holds the virtual tokens
        else:
            prompt, prefix = self._tokens("prompt", batch), self._tokens("prefix", batch)
            if prompt is None and prefix is None:
                return None
            n_p = 0 if prompt is None else prompt.shape[1]
            n_k = 0 if prefix is None else prefix.shape[3]
            pos = kw.get("position_ids")
            if prompt is not None:
                if embeds is None:
                    embeds, kw["input_ids"] = self.base(ids), None
                kw["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype), embeds], 1)
                types = kw.get("token_type_ids")
                if types is not None:
                    kw["token_type_ids"] = torch.cat([types.new_zeros(batch, n_p), types], 1)
                if pos is not None:
                    lead = torch.arange(n_p, device=pos.device, dtype=pos.dtype)
                    pos = torch.cat([lead.expand(pos.shape[0], n_p), pos + n_p], 1)
            if prefix is not None:  # float32 deltas on a half-precision model: the model's dtype
                kw["past_key_values"] = _fill_cache(cache, prefix.to(self.base.weight.dtype))
            if pos is not None:
                kw["position_ids"] = pos + n_k  # real tokens come after the prefix, as in peft
            self._strip, self._cached, added = n_p, n_p + n_k, 0
        if added and kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + added
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            kw["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], self._cached), mask], 1)
        return (), kw

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        n, self._strip = self._strip, 0
        if not n:
            return None
        if isinstance(output, tuple):
            return (output[0][:, n:], *output[1:])
        if getattr(output, "last_hidden_state", None) is not None:
            output.last_hidden_state = output.last_hidden_state[:, n:]
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, n:] for h in output.hidden_states)
        return output

    def extra_repr(self) -> str:
        return f"virtual tokens={self.delta_names()}, active={self._active}"


def _fill_cache(cache: Any, prefix: torch.Tensor) -> Any:
    """A key/value cache holding ``prefix`` ((layers·2, B, heads, n, head_dim)) in every layer."""
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache()
    for layer in range(prefix.shape[0] // 2):
        cache.update(prefix[2 * layer], prefix[2 * layer + 1], layer)
    return cache


def find_backbone(model: nn.Module, embedding_path: str) -> nn.Module:
    """The embedding's nearest ancestor taking ``inputs_embeds`` and ``attention_mask``."""
    parts = embedding_path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        module = get_module(model, ".".join(parts[:cut]))
        params = inspect.signature(module.forward).parameters
        if "inputs_embeds" in params and "attention_mask" in params:
            return module
    raise TargetError(
        f"no module above {embedding_path!r} takes inputs_embeds and attention_mask; prompt and "
        "prefix tuning need a transformers model (e.g. BertModel, LlamaForCausalLM)"
    )


def add_virtual_tokens(
    spec: DeltaSpec, model: nn.Module, name: str,
    build: Callable[[VirtualTokenHost], VirtualTokens],
) -> list[str]:
    """Add the virtual-token delta ``build(host)`` at the model's single input embedding (the one
    ``spec``'s targets select), hosting it in the embedding's :class:`VirtualTokenHost`."""
    paths = select_targets(model, spec)
    if len(paths) != 1:
        raise TargetError(
            f"{type(spec).__name__} needs exactly one input embedding but its targets match "
            f"{paths}; name one"
        )
    path = paths[0]
    module = get_module(model, path)
    if isinstance(module, Host) and not isinstance(module, VirtualTokenHost):
        raise TargetError(f"{path!r} already hosts another kind of delta; detach it first")
    if isinstance(module, VirtualTokenHost):
        host = module
    else:
        host = VirtualTokenHost(module, find_backbone(model, path))
    if name in host.parts:
        raise StateError(f"delta {name!r} is already attached to {path!r}; detach it or rename")
    try:
        part = build(host)
    except Exception:
        if host is not module:
            host.remove_hooks()
        raise
    part.train(host.base.training)
    host.parts[name] = part
    if host is not module:
        set_module(model, path, host)
    return [path]
