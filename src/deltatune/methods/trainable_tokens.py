"""Trainable tokens: new values for a few rows of an embedding, the rest of it frozen.

Unified view: function = ``E'[i] = tᵢ`` for the chosen ``token_indices`` ``i`` (one trained row
``tᵢ`` each), every other row unchanged; position = the input embedding (``nn.Embedding``);
insertion = replacement of those positions' outputs, ``h[p] = t_{x[p]}`` where ``x[p]`` is a chosen
token. The rows start as copies of the base rows, so the model equals the base at init. Typical use:
special tokens added to a tokenizer (after resizing the embedding) trained without training, or
storing, the whole matrix.

Foldable: ``delta_weight`` is ``tᵢ − E[i]`` scattered into a zero ``ΔW``; merging *writes* the rows
(``index_copy``) and unmerging writes back the rows it replaced, bit-exact (``a + (b − a)`` need not
equal ``b`` in floating point, so the additive default is not used). Half-precision bases get
float32 rows, cast at the boundary. Several active deltas on one embedding apply in order, a later
one's rows winning; keep their ``token_indices`` disjoint (peft refuses overlapping ones).

peft: the layout and math of peft 0.21.2's ``TRAINABLE_TOKENS`` tuner (one tensor per embedding,
``<path>.trainable_tokens_delta`` of shape (len(token_indices), dim); ``token_indices`` and
``init_weights`` in the config). Not supported: an embedding whose weight is *tied* to another
module (an ``lm_head`` with ``tie_word_embeddings``) is refused, because peft then also swaps the
output projection's rows and changing only the input side would give different logits (untie the
weights, or use ``trainable_modules`` for the head); embedding subclasses with their own ``forward``
(e.g. Gemma's scaled embedding) and ``max_norm`` embeddings are refused; LoRA's
``trainable_token_indices`` option (trainable tokens *inside* a LoRA file) is not read.

Method: peft's trainable tokens (Hugging Face, 2025), on the sparse-update idea of training only the
embedding rows that matter; reference for selective row/parameter updates: Guo et al., "Parameter-
Efficient Transfer Learning with Diff Pruning", ACL 2021, https://arxiv.org/abs/2012.07463
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..core.delta import Delta
from ..core.example import Example
from ..core.host import DeltaHost, get_module
from ..core.peft_layout import Option, PeftLayout, init_flag
from ..core.spec import DeltaSpec, register
from .prompt import EMBEDDING_TARGETS


@register
@dataclass(frozen=True)
class TrainableTokens(DeltaSpec):
    """Train only the embedding rows ``token_indices`` (e.g. added special tokens); ``init="copy"``
    starts them as the base rows (peft's ``init_weights=True``), ``"random"`` as N(0, 1) draws."""

    method = "trainable_tokens"
    example = Example({"token_indices": tuple(range(3, 50, 3))}, model="transformer", bad=(
        ({"token_indices": (4, 4)}, "token_indices"), ({"token_indices": (-1,)}, "token_indices"),
        ({"token_indices": (1.5,)}, "token_indices"), ({"init": "zeros"}, "init")))
    host_kinds = ("embedding",)
    host_what = "plain nn.Embedding modules (input embeddings)"
    default_targets = EMBEDDING_TARGETS
    peft = PeftLayout(
        "TRAINABLE_TOKENS", tensors=("trainable_tokens_delta",), fixed={"revision": None},
        refuse={}, modules_to_save=False,
        options=(Option("token_indices", required="list the embedding rows it trains"),
                 init_flag("copy", "random")))

    token_indices: tuple[int, ...] = ()
    init: Literal["copy", "random"] = "copy"

    def validate(self) -> None:
        seen: set[int] = set()
        for i in self.token_indices:
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                self.fail("token_indices", f"has {i!r}; indices must be non-negative integers")
            if i in seen:
                self.fail("token_indices", f"lists token {i} twice; give each index once")
            seen.add(i)

    def can_host(self, module: nn.Module) -> bool:
        # A subclass with its own forward (scaled embeddings) would not be a plain row lookup.
        return isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward

    def check_host(self, host: DeltaHost, module_name: str) -> None:
        if not self.token_indices:
            self.fail("token_indices", "is empty; list the embedding rows to train")
        n = host.base.num_embeddings
        too_big = [i for i in self.token_indices if i >= n]
        if too_big:
            self.fail("token_indices", f"has {too_big[0]}, outside {module_name!r} with {n} rows "
                      f"(indices 0..{n - 1}); resize the embedding first")
        if host.base.max_norm is not None:
            self.fail(
                "targets",
                f"selects {module_name!r}, an embedding with max_norm (it rewrites "
                "its rows when read); pick an embedding without max_norm",
            )

    def check_targets(self, model: nn.Module, paths: list[str]) -> None:
        for path in paths:
            module = get_module(model, path)
            weight = getattr(module, "base", module).weight
            for name, param in model.named_parameters(remove_duplicate=False):
                if param is weight and not name.startswith(path + "."):
                    self.fail("targets", f"selects {path!r}, whose weight is tied to "
                              f"{name.rsplit('.', 1)[0]!r}; trainable tokens change the input rows "
                              "only, so untie the weights (tie_word_embeddings=False) first")

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        return TrainableTokensDelta(self, host)


class TrainableTokensDelta(Delta):
    """Parameter ``trainable_tokens_delta`` (n, dim): the new values of rows ``token_indices``.
    Buffers (not saved): ``_slot`` (num_embeddings,), each token's row in it or -1; ``_replaced``,
    the base rows a merge overwrote (None while unmerged)."""

    foldable = True

    def __init__(self, spec: TrainableTokens, host: DeltaHost) -> None:
        super().__init__(spec)
        w = host.weight
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        index = torch.tensor(spec.token_indices, dtype=torch.long, device=w.device)
        slot = torch.full((w.shape[0],), -1, dtype=torch.long, device=w.device)
        slot[index] = torch.arange(len(index), device=w.device)
        self.register_buffer("_index", index, persistent=False)
        self.register_buffer("_slot", slot, persistent=False)
        self.register_buffer("_replaced", None, persistent=False)
        if spec.init == "copy":
            rows = w.detach()[index].to(dtype)
        else:
            rows = torch.randn(len(index), w.shape[1], dtype=dtype, device=w.device)
        self.trainable_tokens_delta = nn.Parameter(rows.clone())

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        slot = self._slot[x]  # (...,) this delta's row for each token, -1 elsewhere
        new = self.trainable_tokens_delta[slot.clamp(min=0)].to(h.dtype)  # (..., dim)
        return torch.where((slot >= 0).unsqueeze(-1), new, h)

    def _base_rows(self, host: DeltaHost) -> torch.Tensor:
        return self._replaced if self._replaced is not None else host.weight.detach()[self._index]

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        rows = self.trainable_tokens_delta.detach()
        dw = torch.zeros(host.weight.shape, dtype=rows.dtype, device=rows.device)
        dw[self._index] = rows - self._base_rows(host).to(rows.dtype)
        return {"weight": dw}

    @torch.no_grad()
    def merge_into(self, host: DeltaHost) -> None:
        w = host.base_param("weight")
        self._replaced = w[self._index].clone()
        w.index_copy_(0, self._index, self.trainable_tokens_delta.to(w.dtype))

    @torch.no_grad()
    def unmerge_from(self, host: DeltaHost) -> None:
        w = host.base_param("weight")
        w.index_copy_(0, self._index, self._replaced)
        self._replaced = None
