"""peft's file layout for the LoRA family (adapter_config.json + adapter_model.safetensors).

Kept apart from :mod:`lora` so the method file stays about the method; :mod:`lora` declares it
(``peft = LORA_LAYOUT``). It is the one layout that is mostly code: the config holds one rank and
alpha for the whole adapter plus per-module ``rank_pattern``/``alpha_pattern`` regexes; PiSSA/OLoRA
deltas are written as the rank-2r LoRA peft can load; DoRA adds a magnitude vector; ``bias``
writes the module's full trained bias, as peft trains it in place.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Mapping

import torch

from ..core.delta import Delta
from ..core.errors import DeltaFileError
from ..core.host import Host
from ..core.peft_layout import PeftLayout
from ..core.spec import DeltaSpec
from .bias import BiasDelta


def _is_pissa(d: Any) -> bool:
    return getattr(d, "init_A", None) is not None


def _peft_rank_alpha(d: Any) -> tuple[int, float]:
    """Rank and alpha of the adapter peft sees (PiSSA/OLoRA: the rank-2r form, same scaling)."""
    r = 2 * d.r if _is_pissa(d) else d.r
    alpha = d.scaling * (math.sqrt(r) if d.spec.rslora else r)
    return r, alpha


def _pattern(path: str) -> str:
    return f"^{path}$".replace(".", r"\.")


class LoRALayout(PeftLayout):
    """LoRA's layout: one rank/alpha with per-module patterns; factors, DoRA magnitudes and biases
    converted by code (the LoRA layers and ``bias="all"``'s plain bias shifts)."""

    def config(self, spec: DeltaSpec, deltas: dict[str, Delta]) -> dict[str, Any]:
        self.check_saving(spec, deltas)
        lora = {p: d for p, d in deltas.items() if not isinstance(d, BiasDelta)}
        shapes = {p: _peft_rank_alpha(d) for p, d in lora.items()}
        r, alpha = Counter(shapes.values()).most_common(1)[0][0]
        return {
            "peft_type": self.peft_type,
            "task_type": None,
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": spec.dropout,
            "target_modules": sorted(lora),
            "exclude_modules": None,
            "bias": spec.bias,
            "fan_in_fan_out": any(d.fan_in_fan_out for d in lora.values()),
            "use_rslora": spec.rslora,
            "use_dora": spec.dora,
            "init_lora_weights": True,
            "rank_pattern": {_pattern(p): s[0] for p, s in shapes.items() if s[0] != r},
            "alpha_pattern": {_pattern(p): s[1] for p, s in shapes.items() if s[1] != alpha},
            "modules_to_save": list(spec.trainable_modules) or None,
            "inference_mode": True,
            "base_model_name_or_path": None,
        }

    def spec(self, cls: type[DeltaSpec], config: Mapping[str, Any], targets: list[str]
             ) -> DeltaSpec:
        self.refuse_options(config)
        # PiSSA/OLoRA inits (peft converts such adapters to plain LoRA before sharing): the
        # weights are what count, so any init reads back as the default one
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

    def save(self, delta: Any, host: Host) -> dict[str, torch.Tensor]:
        base_bias = getattr(host.base, "bias", None)
        if isinstance(delta, BiasDelta):  # peft trains the module's own bias: its full value
            return {"bias": base_bias.detach() + delta.bias.detach().to(base_bias.dtype)}
        a, b = delta.lora_A.detach(), delta.lora_B.detach()
        if _is_pissa(delta):  # s·(BA − B0A0) = s·[B, −B0]·[A; A0]: rank-2r LoRA on the original W
            a = torch.cat([a, delta.init_A])
            b = torch.cat([b, -delta.init_B], dim=1)
        if delta.kind == "embedding":
            out = {"lora_embedding_A": a, "lora_embedding_B": b}
        else:
            out = {"lora_A.weight": a, "lora_B.weight": b}
        if delta.variant.name == "dora":
            m = delta.lora_magnitude.detach()
            out["lora_magnitude_vector"] = (
                m.view(1, -1, *([1] * (a.dim() - 2))) if delta.kind == "conv" else m
            )
        if delta.lora_bias is not None:
            out["base_layer.bias"] = base_bias.detach() + delta.lora_bias.detach().to(
                base_bias.dtype
            )
        return out

    def load(self, delta: Any, host: Host, tensors: dict[str, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
        base_bias = getattr(host.base, "bias", None)
        if isinstance(delta, BiasDelta):
            return {"bias": tensors["bias"].to(delta.bias.dtype)
                    - base_bias.detach().to(delta.bias.dtype)}
        prefix = "lora_embedding_" if delta.kind == "embedding" else "lora_"
        suffix = "" if delta.kind == "embedding" else ".weight"
        try:
            out = {"lora_A": tensors[f"{prefix}A{suffix}"],
                   "lora_B": tensors[f"{prefix}B{suffix}"]}
            if delta.variant.name == "dora":
                out["lora_magnitude"] = tensors["lora_magnitude_vector"].flatten()
        except KeyError as exc:
            raise DeltaFileError(f"peft file lacks tensor {exc.args[0]!r} for a LoRA module; "
                                 "the file is incomplete") from exc
        own = delta.lora_bias
        if own is not None and "base_layer.bias" in tensors:
            out["lora_bias"] = (tensors["base_layer.bias"].to(own.dtype)
                                - base_bias.detach().to(own.dtype))
        elif own is not None:
            out["lora_bias"] = torch.zeros_like(own)
        return out


LORA_LAYOUT = LoRALayout(
    "LORA",
    extra_suffixes=("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B",
                    "lora_magnitude_vector", "base_layer.bias"),
    # LoRA takes peft's bias option (lora_only, all); these it cannot express
    refuse={key: None for key in ("layers_to_transform", "layer_replication", "loftq_config",
                                  "megatron_config", "trainable_token_indices")},
)
