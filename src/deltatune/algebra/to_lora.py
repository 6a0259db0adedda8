"""Any foldable delta as a LoRA: the truncated SVD of its weight change, layer by layer.

A LoRA is what every serving stack loads (peft, vLLM, llama.cpp): converting an OFT, (IA)³, LoHa,
FourierFT, ... delta to one makes it portable. The best rank-r approximation in Frobenius norm of
each layer's ``ΔW`` (Eckart–Young) is exact when the change's rank is at most r; the relative error
is reported per layer and over the whole delta, so the user sees what the rank costs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import MergeError


@dataclass
class LoRAApproximation:
    """What :func:`to_lora` built: the LoRA's name, its rank per layer, the relative Frobenius error
    of each layer's weight change (``‖ΔW − ΔW_lora‖ / ‖ΔW‖``) and over the whole delta, its size."""

    name: str
    ranks: dict[str, int]
    errors: dict[str, float] = field(default_factory=dict)
    error: float = 0.0
    parameters: int = 0


def to_lora(
    model: nn.Module,
    name: str = "default",
    *,
    rank: int = 8,
    lora_name: str | None = None,
    activate: bool = True,
) -> LoRAApproximation:
    """Attach LoRA ``lora_name`` (default ``"<name>-lora"``) whose weight change is the best
    rank-``rank`` approximation of foldable delta ``name`` on every layer it touches (capped at each
    layer's own rank, where it is exact); bias changes and trainable module copies are carried over
    exactly. It saves in deltatune's or peft's layout; detach ``name`` to keep only the LoRA."""
    from ..core.host import DeltaHost, iter_hosts
    from ..core.model import attach, delta_names, get_spec, set_active
    from ..io.adapter import parts_of
    from ..methods.lora import LoRA

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise MergeError(f"rank must be a positive integer, got {rank!r}")
    if name not in delta_names(model):
        known = ", ".join(delta_names(model)) or "none"
        raise MergeError(f"no delta named {name!r} is attached; attached: {known}")
    lora_name = lora_name or f"{name}-lora"
    changes: dict[str, dict[str, torch.Tensor]] = {}
    limits: dict[str, int] = {}
    for path, host in iter_hosts(model):
        if not isinstance(host, DeltaHost) or name not in host.delta_names():
            continue
        delta = host.part(name)
        if not delta.foldable:
            raise MergeError(
                f"delta {name!r} ({delta.spec.method}) at {path!r} is not a weight change; only "
                "foldable deltas convert to a LoRA"
            )
        if host.kind not in ("linear", "conv", "embedding") or host.max_rank is None:
            raise MergeError(
                f"delta {name!r} changes {path!r} ({type(host.base).__name__}), which a LoRA "
                "cannot hold (Linear, Conv and Embedding layers only)"
            )
        changes[path] = {k: v.detach() for k, v in delta.delta_weight(host).items()}
        limits[path] = host.max_rank
    weighted = {p: c for p, c in changes.items() if "weight" in c}
    if not weighted:
        raise MergeError(f"delta {name!r} changes no weight a LoRA can hold")
    ranks = {p: min(rank, limits[p]) for p in weighted}
    top = max(ranks.values())
    bias = any("bias" in c for c in weighted.values())
    spec = LoRA(
        r=top,
        alpha=float(top),
        target_regex="|".join(re.escape(p) for p in weighted),
        rank_pattern=ranks,
        alpha_pattern={p: float(r) for p, r in ranks.items()},
        bias="lora_only" if bias else "none",
        trainable_modules=get_spec(model, name).trainable_modules,
    )
    attach(model, spec, lora_name, activate=False)
    result = LoRAApproximation(lora_name, ranks)
    total = wrong = 0.0
    try:
        hosts = dict(iter_hosts(model))
        for path, change in weighted.items():
            part = hosts[path].part(lora_name)
            zero = torch.zeros_like(part.lora_bias) if part.lora_bias is not None else None
            err = part.set_weight_change(change["weight"], change.get("bias", zero))
            norm = float(change["weight"].double().norm())
            result.errors[path] = err
            total += norm**2
            wrong += (err * norm) ** 2
        new_deltas, new_copies = parts_of(model, lora_name)
        _, old_copies = parts_of(model, name)
        for path, module in new_copies.items():
            module.load_state_dict(old_copies[path].state_dict())
    except BaseException:
        from ..core.model import detach

        detach(model, lora_name)
        raise
    result.error = math.sqrt(wrong / total) if total > 0 else 0.0
    result.parameters = sum(p.numel() for d in new_deltas.values() for p in d.parameters())
    if activate:
        set_active(model, [lora_name])
    return result
