"""VB-LoRA: LoRA factors composed from one vector bank shared by every adapted layer.

Unified view: function = low-rank linear map ``B·A`` (rank ``r``) whose rows are cut into tiles of
``vector_length``; each tile is a softmax-weighted mix of the ``topk`` bank vectors its trained
logits rank highest. The bank (``num_vectors`` × ``vector_length``) is one set of trained
parameters shared by all layers; each layer trains only its logits. Position = Linear / GPT-2
Conv1D layers (attention query/value by default); insertion = parallel, ``h + B·A·x``. Foldable
and additive, and exactly rank ``r``: it has ``factors``. Both factors start random, so (as in
peft) a fresh delta does not equal the base model.

The bank is one module instance registered in every delta of an attach (saved under each host,
shared again when loaded); peft saves it once, as ``base_model.vblora_vector_bank``. With
``save_only_topk_weights`` the peft file keeps only each tile's top-k indices and weights; such
a file is read back as logits that select and weigh the same vectors (for inference and merging).

Paper: Li et al., "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks",
NeurIPS 2024, https://arxiv.org/abs/2405.15179
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import Delta, Factor
from ..core.errors import DeltaFileError
from ..core.example import Example
from ..core.host import DeltaHost, Host
from ..core.peft_layout import Option, PeftLayout
from ..core.spec import DeltaSpec, register
from ..core.targets import ATTENTION_QV

_BANK = "base_model.vblora_vector_bank"
_LOGITS = ("vblora_logits_A", "vblora_logits_B")
#: the compact file's tensors (``save_only_topk_weights``)
_TOPK = tuple(f"{k}_topk_{w}" for k in _LOGITS for w in ("indices", "weights"))


class VectorBank(nn.Module):
    """The shared bank: ``vblora_vector_bank`` (num_vectors, vector_length), uniform in ±bound."""

    def __init__(self, num_vectors: int, vector_length: int, bound: float) -> None:
        super().__init__()
        bank = torch.empty(num_vectors, vector_length).uniform_(-bound, bound)
        self.vblora_vector_bank = nn.Parameter(bank)


# -- peft's layout --------------------------------------------------------------------------------
class _VBLoRALayout(PeftLayout):
    """The bank goes to the file's root once; with ``save_only_topk_weights`` each tile keeps only
    its top-k indices and weights (read back as logits that select and weigh the same vectors)."""

    def shared_tensors(self, spec: Any, deltas: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {_BANK: next(iter(deltas.values())).bank.vblora_vector_bank.detach()}

    def save(self, delta: Any, host: Host) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        spec = delta.spec
        for key in _LOGITS:
            logits = getattr(delta, key).detach()
            if not spec.save_only_topk_weights:
                out[key] = logits
                continue
            top, idx = logits.topk(spec.topk, dim=-1)
            out[f"{key}_topk_indices"] = idx.to(_index_dtype(spec.num_vectors))
            # the last weight is 1 - the others: peft leaves it out
            out[f"{key}_topk_weights"] = F.softmax(top, dim=-1)[..., :-1].contiguous()
        return out

    def load(self, delta: Any, host: Host, tensors: dict[str, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
        if _BANK not in tensors:
            raise DeltaFileError(f"peft VB-LoRA file lacks {_BANK!r}; the file is incomplete")
        out = {"bank.vblora_vector_bank": tensors[_BANK]}
        for key in _LOGITS:
            if key in tensors:
                out[key] = tensors[key]
            elif f"{key}_topk_indices" in tensors and f"{key}_topk_weights" in tensors:
                out[key] = _logits_from_topk(delta, key, tensors[f"{key}_topk_indices"],
                                             tensors[f"{key}_topk_weights"])
            else:
                raise DeltaFileError(f"peft VB-LoRA file lacks {key!r} (or its top-k form) for a "
                                     "module; the file is incomplete")
        return out


def _index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer type peft stores top-k indices in."""
    if num_vectors < 2**8:
        return torch.uint8
    return (
        torch.int16 if num_vectors < 2**15 else torch.int32 if num_vectors < 2**31 else torch.int64
    )


def _logits_from_topk(delta: Any, key: str, idx: torch.Tensor, weights: torch.Tensor
                      ) -> torch.Tensor:
    """Finite logits whose top-k are ``idx`` with softmax ``weights`` (the stored k-1 and the
    remainder): log-weights there, and below them everywhere else."""
    shape, k = getattr(delta, key).shape, delta.spec.topk
    if idx.shape != (*shape[:-1], k) or weights.shape != (*shape[:-1], k - 1):
        raise DeltaFileError(f"peft VB-LoRA top-k tensors of {key} have shapes "
                             f"{tuple(idx.shape)}/{tuple(weights.shape)}, not fitting "
                             f"{tuple(shape)} at topk={k}")
    idx = idx.long()
    if idx.numel() and (idx.min() < 0 or idx.max() >= shape[-1]):
        raise DeltaFileError(f"peft VB-LoRA top-k indices of {key} exceed the bank's "
                             f"{shape[-1]} vectors; the file is damaged")
    weights = weights.float()
    full = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
    top = full.clamp_min(1e-30).log()  # a zero weight stays finite (and ~0 after softmax)
    floor = top.min(-1, keepdim=True).values - 1.0  # any value below the top-k selects them
    return floor.expand(*shape).clone().scatter(-1, idx, top)


@register
@dataclass(frozen=True)
class VBLoRA(DeltaSpec):
    """Vector-bank LoRA on Linear / GPT-2 Conv1D layers: rank ``r`` factors tiled by
    ``vector_length`` (it must divide every adapted layer's in and out features), each tile a mix
    of the ``topk`` of ``num_vectors`` shared vectors; ``save_only_topk_weights`` writes peft's
    compact file (inference and merging only)."""

    method = "vblora"
    example = Example({"r": 2, "num_vectors": 8, "vector_length": 4, "targets": ("fc1", "fc2")},
                      identity_at_init=False, bad=(
        ({"r": 0}, "r"), ({"topk": 0}, "topk"), ({"num_vectors": 1, "topk": 2}, "topk"),
        ({"vector_length": 0}, "vector_length"), ({"dropout": 1.0}, "dropout"),
        ({"init_vector_bank_bound": 0.0}, "init_vector_bank_bound"),
        ({"init_logits_std": -1.0}, "init_logits_std")))
    default_targets = ATTENTION_QV
    host_what = "Linear / GPT-2 Conv1D modules"
    peft = _VBLoRALayout(
        "VBLORA", shared_keys=(_BANK,), fan_in_fan_out=True,
        extra_suffixes=(*_LOGITS, *_TOPK),
        options=(Option("r", default=4), Option("num_vectors", default=256),
                 Option("vector_length", default=256), Option("topk", default=2),
                 Option("save_only_topk_weights", default=False),
                 Option("vblora_dropout", "dropout", 0.0),
                 Option("init_vector_bank_bound", default=0.02),
                 Option("init_logits_std", default=0.1)))

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    dropout: float = 0.0
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    save_only_topk_weights: bool = False

    def validate(self) -> None:
        for name, what in (("r", "the rank of B·A"), ("num_vectors", "vectors in the bank"),
                           ("vector_length", "the length of each bank vector")):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                self.fail(name, f"must be a positive integer ({what})")
        if not isinstance(self.topk, int) or isinstance(self.topk, bool) or self.topk < 1:
            self.fail("topk", "must be a positive integer (bank vectors mixed per tile)")
        if self.topk > self.num_vectors:
            self.fail("topk", f"exceeds num_vectors={self.num_vectors}; use topk <= num_vectors")
        if not 0.0 <= self.dropout < 1.0:
            self.fail("dropout", "must be in [0, 1)")
        if not (math.isfinite(self.init_vector_bank_bound) and self.init_vector_bank_bound > 0):
            self.fail("init_vector_bank_bound", "must be a finite number > 0 (a zero bank gets no "
                      "gradient)")
        if not (math.isfinite(self.init_logits_std) and self.init_logits_std >= 0):
            self.fail("init_logits_std", "must be a finite number >= 0")

    def check_host(self, host: DeltaHost, module_name: str) -> None:
        n_in, n_out, v = host.in_features, host.out_features, self.vector_length
        if n_in % v or n_out % v:
            self.fail("vector_length", f"does not divide the {n_out}x{n_in} weight of "
                      f"{module_name!r} (tiles cover whole rows and columns); use a common "
                      f"divisor such as {math.gcd(n_in, n_out)}")

    def shared_state(self, model: nn.Module, paths: list[str]) -> VectorBank:
        """The bank, drawn once per attach: one module, registered in every delta."""
        return VectorBank(self.num_vectors, self.vector_length, self.init_vector_bank_bound)

    def make_delta(self, host: DeltaHost, module_name: str, shared: Any = None) -> Delta:
        return VBLoRADelta(self, host, shared)


class VBLoRADelta(Delta):
    """``h + B·A·dropout(x)``; ``vblora_logits_A`` (r, in/L, N) and ``vblora_logits_B``
    (out/L, r, N) rank the N bank vectors for each length-L tile of ``A`` and ``B``."""

    foldable = True

    def __init__(self, spec: VBLoRA, host: DeltaHost, bank: VectorBank) -> None:
        super().__init__(spec)
        self.fan_in_fan_out = host.fan_in_fan_out
        length, n = spec.vector_length, spec.num_vectors
        self.bank = bank  # the same module in every delta of this attach
        std = spec.init_logits_std
        self.vblora_logits_A = nn.Parameter(
            torch.randn(spec.r, host.in_features // length, n) * std
        )
        self.vblora_logits_B = nn.Parameter(
            torch.randn(host.out_features // length, spec.r, n) * std
        )
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    def _mix(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., N) logits -> (..., L): the softmax-weighted sum of the top-k bank vectors."""
        top, idx = logits.float().topk(self.spec.topk, dim=-1)
        bank = self.bank.vblora_vector_bank.float()
        return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[idx]).sum(-2)

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` (r, in) and ``B`` (out, r) in float32."""
        a = self._mix(self.vblora_logits_A).reshape(self.spec.r, -1)  # (r, in/L, L) -> (r, in)
        # (out/L, r, L) -> (out/L, L, r) -> (out, r)
        b = self._mix(self.vblora_logits_B).transpose(1, 2).reshape(-1, self.spec.r)
        return a, b

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        a, b = self.matrices()
        return h + F.linear(F.linear(self.dropout(x.float()), a), b).to(h.dtype)

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        a, b = self.matrices()
        w = (b @ a).detach()
        return {"weight": w.t() if self.fan_in_fan_out else w}

    def factors(self, host: DeltaHost) -> list[Factor] | None:
        a, b = self.matrices()
        return [Factor(a.detach(), b.detach(), 1.0, bool(self.fan_in_fan_out))]
