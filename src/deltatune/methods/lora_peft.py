"""peft's file layout for the LoRA family (adapter_config.json + adapter_model.safetensors).

Kept apart from :mod:`lora` so the method file stays about the method; attached to the spec/delta
classes below (peft_type, to_peft_config, to_peft, from_peft).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch

from ..core.errors import DeltaFileError
from ..core.host import DeltaHost
from .lora import LoRA, LoRADelta

_UNSUPPORTED = (
    "layers_to_transform",
    "layer_replication",
    "loftq_config",
    "megatron_config",
    "trainable_token_indices",
)


def _is_pissa(d: LoRADelta) -> bool:
    return getattr(d, "init_A", None) is not None


def _peft_rank_alpha(d: LoRADelta) -> tuple[int, float]:
    """Rank and alpha of the adapter peft sees (PiSSA/OLoRA: the rank-2r form, same scaling)."""
    r = 2 * d.r if _is_pissa(d) else d.r
    alpha = d.scaling * (math.sqrt(r) if d.spec.rslora else r)
    return r, alpha


def to_peft_config(self: LoRA, deltas: dict[str, Any]) -> dict[str, Any]:
    lora = {p: d for p, d in deltas.items() if isinstance(d, LoRADelta)}
    shapes = {p: _peft_rank_alpha(d) for p, d in lora.items()}
    r, alpha = Counter(shapes.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": self.dropout,
        "target_modules": sorted(lora),
        "exclude_modules": None,
        "bias": self.bias,
        "fan_in_fan_out": any(d.fan_in_fan_out for d in lora.values()),
        "use_rslora": self.rslora,
        "use_dora": self.dora,
        "init_lora_weights": True,
        "rank_pattern": {
            f"^{p}$".replace(".", r"\."): s[0] for p, s in shapes.items() if s[0] != r
        },
        "alpha_pattern": {
            f"^{p}$".replace(".", r"\."): s[1] for p, s in shapes.items() if s[1] != alpha
        },
        "modules_to_save": list(self.trainable_modules) or None,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }


@classmethod
def from_peft_config(cls, config: dict[str, Any], targets: list[str]) -> LoRA:
    for key in _UNSUPPORTED:
        if config.get(key):
            raise DeltaFileError(
                f"peft option {key}={config[key]!r} is not supported by deltatune; save the adapter without it"
            )
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        # PiSSA/OLoRA adapters must be converted by peft before sharing; the weights are what count.
        init = True
    return cls(
        r=int(config.get("r", 8)),
        alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout", 0.0)),
        rslora=bool(config.get("use_rslora", False)),
        dora=bool(config.get("use_dora", False)),
        bias=config.get("bias", "none"),
        targets=tuple(targets),
        rank_pattern={k: int(v) for k, v in (config.get("rank_pattern") or {}).items()},
        alpha_pattern={k: float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
        trainable_modules=tuple(config.get("modules_to_save") or ()),
    )


def to_peft(self: LoRADelta, host: DeltaHost) -> dict[str, torch.Tensor]:
    a, b = self.lora_A.detach(), self.lora_B.detach()
    if _is_pissa(
        self
    ):  # s·(BA − B0A0) = s·[B, −B0]·[A; A0]: a plain rank-2r LoRA on the original W
        a = torch.cat([a, self.init_A])
        b = torch.cat([b, -self.init_B], dim=1)
    if self.kind == "embedding":
        out = {"lora_embedding_A": a, "lora_embedding_B": b}
    else:
        out = {"lora_A.weight": a, "lora_B.weight": b}
    if self.variant.name == "dora":
        m = self.lora_magnitude.detach()
        out["lora_magnitude_vector"] = (
            m.view(1, -1, *([1] * (a.dim() - 2))) if self.kind == "conv" else m
        )
    if self.lora_bias is not None:
        out["base_layer.bias"] = host.base.bias.detach() + self.lora_bias.detach().to(
            host.base.bias.dtype
        )
    return out


def from_peft(
    self: LoRADelta, host: DeltaHost, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    prefix = "lora_embedding_" if self.kind == "embedding" else "lora_"
    suffix = "" if self.kind == "embedding" else ".weight"
    try:
        out = {"lora_A": tensors[f"{prefix}A{suffix}"], "lora_B": tensors[f"{prefix}B{suffix}"]}
        if self.variant.name == "dora":
            out["lora_magnitude"] = tensors["lora_magnitude_vector"].flatten()
    except KeyError as exc:
        raise DeltaFileError(
            f"peft file lacks tensor {exc.args[0]!r} for a LoRA module; the file is incomplete"
        ) from exc
    if self.lora_bias is not None and "base_layer.bias" in tensors:
        out["lora_bias"] = tensors["base_layer.bias"].to(
            self.lora_bias.dtype
        ) - host.base.bias.detach().to(self.lora_bias.dtype)
    elif self.lora_bias is not None:
        out["lora_bias"] = torch.zeros_like(self.lora_bias)
    return out


LoRA.peft_type = "LORA"
LoRA.peft_suffixes = (
    "lora_A.weight",
    "lora_B.weight",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "base_layer.bias",
)
LoRA.to_peft_config = to_peft_config
LoRA.from_peft_config = from_peft_config
LoRADelta.to_peft = to_peft
LoRADelta.from_peft = from_peft
