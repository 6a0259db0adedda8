"""Prefix tuning: trained key/value vectors prepended to every attention layer.

Function: ``n`` virtual positions per layer whose keys and values are trained directly, or produced
by a reparameterisation MLP (``projection``: an embedding of the ``n`` positions through
``Linear → tanh → Linear``) that steadies training and can be dropped afterwards
(:meth:`PrefixTuning.drop_reparameterization` keeps only the key/values it computes). Insertion:
the prefixes enter the model as a pre-filled key/value cache with the attention mask extended, so
every transformers attention implementation and grouped-query attention take them unchanged; the
real tokens' positions continue after the prefix, as in peft. ``gate`` adds UniPELT's per-layer
gate, a learned sigmoid factor on each layer's prefix (see :mod:`.unified`).

Paper: Li & Liang, https://arxiv.org/abs/2101.00190
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.errors import TargetError
from ..core.example import Example
from ..core.host import iter_hosts
from ..core.spec import DeltaSpec, register
from ..core.virtual import VirtualTokenHost, VirtualTokens
from .prompt import EMBEDDING_TARGETS, PromptLayout, inject_virtual


def _no_gate(spec: DeltaSpec, deltas: dict[str, Any]) -> str:
    if next(iter(deltas.values())).gate_logits is not None:
        return "peft's prefix tuning has no per-layer gate"
    return ""


def _prefix_options(spec: Any, deltas: dict[str, Any]) -> dict[str, Any]:
    """peft's layout: one (n, layers·2·kv_width) tensor of the final key/values."""
    layers, heads, head_dim = next(iter(deltas.values())).geometry
    return {"token_dim": heads * head_dim, "num_attention_heads": heads,
            "encoder_hidden_size": spec.projection_hidden or heads * head_dim,
            "prefix_projection": spec.projection}


@register
@dataclass(frozen=True)
class PrefixTuning(DeltaSpec):
    """Key/value prefixes of ``num_virtual_tokens`` positions in every layer. ``projection``:
    train them through an MLP of width ``projection_hidden`` (default: the key/value width);
    ``init_std``: scale of the direct prefixes' normal init (small: attention starts near the
    base model's)."""

    method = "prefix"
    example = Example(dict(num_virtual_tokens=3, projection=True, projection_hidden=8),
                      model="transformer", identity_at_init=False, merges=False,
                      bad=(({"num_virtual_tokens": 0}, "num_virtual_tokens"),
                           ({"init_std": 0.0}, "init_std")))
    host_kinds = ("embedding",)
    default_targets = EMBEDDING_TARGETS
    # peft saves the key/values themselves (it runs its MLP before saving): they load directly
    peft = PromptLayout("PREFIX_TUNING", tensors=("prefix",), root_tensors=True,
                        check=_no_gate, write=_prefix_options, fixed={"init_weights": None})

    num_virtual_tokens: int = 20
    projection: bool = False
    projection_hidden: int | None = None
    init_std: float = 0.02
    gate: bool = False

    def validate(self) -> None:
        for field in ("num_virtual_tokens", "projection_hidden"):
            value = getattr(self, field)
            if value is None and field == "projection_hidden":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self.fail(field, "must be a positive integer")
        if self.projection_hidden is not None and not self.projection:
            self.fail("projection_hidden", "needs projection=True")
        if not self.init_std > 0:
            self.fail("init_std", "must be > 0")

    def inject(self, model: nn.Module, name: str) -> list[str]:
        """Virtual key/value tokens in every attention call: not a delta on a module's output, so it
        goes through the virtual-token host instead of the engine's DeltaHost surgery."""
        return inject_virtual(self, model, name, lambda host: PrefixKV(self, host))

    def without_projection(self) -> "PrefixTuning":
        return self.replace(projection=False, projection_hidden=None)  # type: ignore[return-value]

    @staticmethod
    def drop_reparameterization(model: nn.Module, name: str = "default") -> None:
        """Replace delta ``name``'s prefix MLP by the key/values it computes (outputs unchanged).

        The delta's spec becomes the projection-free one, so a saved delta holds only prefixes.
        """
        for _, host in list(iter_hosts(model)):
            if not isinstance(host, VirtualTokenHost) or name not in host.delta_names():
                continue
            old = host.part(name)
            if not isinstance(old, PrefixKV) or old.transform is None:
                continue
            new = PrefixKV(old.member_spec.without_projection(), host, table=old.table().detach())
            new.gate_logits = old.gate_logits
            new.peft_task = old.peft_task
            new.train(old.training)
            host.parts[name] = new
            spec = old.spec.without_projection()  # a composite's spec changes for all its parts
            for _, other in iter_hosts(model):
                if name in other.delta_names() and hasattr(other.part(name), "spec"):
                    other.part(name).spec = spec


def kv_geometry(host: VirtualTokenHost) -> tuple[int, int, int]:
    """(layers, key/value heads, head width) of the backbone's attention, from its config."""
    cfg = host.config
    if cfg is None or not hasattr(cfg, "num_hidden_layers"):
        raise TargetError(
            "prefix tuning needs a transformers model with a config (num_hidden_layers, "
            "num_attention_heads)"
        )
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, head_dim


class PrefixKV(VirtualTokens):
    """``prefix``: ``(n, layers·2·kv_heads·head_dim)`` (peft's layout), or ``embedding`` and
    ``transform`` computing it; ``gate_logits``: ``(layers,)`` when gated."""

    kind = "prefix"
    peft_task: str = "FEATURE_EXTRACTION"  # peft's task_type for the model's class, set on attach

    def __init__(
        self, spec: PrefixTuning, host: VirtualTokenHost, table: torch.Tensor | None = None
    ) -> None:
        super().__init__(spec)
        self.member_spec = spec  # kept when a composite spec (MAM, UniPELT) replaces ``spec``
        self.geometry = layers, heads, head_dim = kv_geometry(host)
        self.layers = layers
        self.num_tokens = n = spec.num_virtual_tokens
        width = heads * head_dim
        weight = host.base.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        kw: dict[str, Any] = {"dtype": dtype, "device": weight.device}
        if spec.projection:
            hidden = spec.projection_hidden or width
            self.embedding = nn.Parameter(torch.randn(n, width, **kw))
            self.transform = nn.Sequential(
                nn.Linear(width, hidden, **kw), nn.Tanh(),
                nn.Linear(hidden, layers * 2 * width, **kw),
            )
            self.prefix = None
        else:
            if table is None:
                table = torch.randn(n, layers * 2 * width, **kw) * spec.init_std
            self.prefix = nn.Parameter(table.to(**kw).clone())
            self.embedding = self.transform = None
        self.gate_logits = nn.Parameter(torch.zeros(layers, **kw)) if spec.gate else None

    def table(self) -> torch.Tensor:
        """``(n, layers·2·kv_width)``: the prefixes in peft's flattened layout."""
        return self.transform(self.embedding) if self.transform is not None else self.prefix

    def values(self) -> torch.Tensor:
        layers, heads, head_dim = self.geometry
        # (n, layers·2·heads·head_dim) → (layers·2, heads, n, head_dim); slot 2l: layer l's keys,
        # slot 2l + 1: its values
        kv = self.table().view(self.num_tokens, layers * 2, heads, head_dim).permute(1, 2, 0, 3)
        if self.gate_logits is not None:
            kv = kv * torch.sigmoid(self.gate_logits).repeat_interleave(2).view(-1, 1, 1, 1)
        return kv
